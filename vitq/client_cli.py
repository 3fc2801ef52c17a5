"""Client verbs of the ``vitq`` CLI: jobs, datasets, models, results, through the REST API
(``vitq.client``). Waiting shows one live progress bar on a terminal, plain lines otherwise.

``vitq.cli`` calls ``add_client_commands(subparsers)``; ``python -m vitq.client_cli`` runs the same
verbs on their own. The verbs that run the service itself are in ``vitq.server_cli``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vitq.cli_args import add_bits_or_target_arguments, given, target_fields
from vitq.progress import JobProgress


def _client(args: argparse.Namespace):  # noqa: ANN202
    from vitq.client import Client

    return Client(args.url, api_key=args.api_key)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _wait(client: Any, job_id: str, timeout: float | None) -> dict[str, Any]:
    with JobProgress(job_id) as show:
        return client.wait(job_id, timeout=timeout, on_progress=show)


def cmd_jobs_submit(args: argparse.Namespace) -> int:
    from vitq.client import VitqApiError

    model: Any = args.model
    if args.model.startswith("{"):
        model = json.loads(args.model)
    options = given(
        {"iters": args.iters, "calib_size": args.calib_size, "batch_size": args.batch_size, "seed": args.seed}
    )
    body: dict[str, Any] = {
        "model": model,
        "method": args.method,
        "preset": args.preset,
        "calibration": args.calibration,
        "options": options,
    }
    # The API checks the combination (fixed bits or a target, not both; a target needs evaluation data).
    body.update(given({"w_bits": args.w_bits, "a_bits": args.a_bits}))
    target = target_fields(args)
    if target:
        body["target"] = target
    if args.evaluation:
        body["evaluation"] = args.evaluation
    if args.webhook_url:
        body["webhook_url"] = args.webhook_url
    with _client(args) as client:
        try:
            job = client.submit_job(idempotency_key=args.idempotency_key, **body)
            if args.wait:
                job = _wait(client, job["id"], args.timeout)
        except VitqApiError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    _print_json(job)
    return 0 if job["status"] in ("queued", "running", "succeeded") else 1


def cmd_jobs_status(args: argparse.Namespace) -> int:
    from vitq.client import VitqApiError

    with _client(args) as client:
        try:
            _print_json(client.get_job(args.job_id))
        except VitqApiError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


def cmd_jobs_wait(args: argparse.Namespace) -> int:
    from vitq.client import VitqApiError

    with _client(args) as client:
        try:
            job = _wait(client, args.job_id, args.timeout)
        except (VitqApiError, TimeoutError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    _print_json(job)
    return 0 if job["status"] == "succeeded" else 1


def cmd_jobs_download(args: argparse.Namespace) -> int:
    from vitq.client import VitqApiError

    with _client(args) as client:
        try:
            if args.name:
                paths = [client.download_artifact(args.job_id, args.name, Path(args.out))]
            else:
                paths = client.download_artifacts(args.job_id, args.out)
        except VitqApiError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    for path in paths:
        print(path)
    return 0


def cmd_datasets_upload(args: argparse.Namespace) -> int:
    from vitq.client import VitqApiError

    with _client(args) as client:
        try:
            _print_json(client.upload_dataset(args.file))
        except VitqApiError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


def cmd_models_upload(args: argparse.Namespace) -> int:
    from vitq.client import VitqApiError

    try:
        kwargs = json.loads(args.timm_kwargs)
        preprocess = json.loads(args.preprocess) if args.preprocess else None
    except json.JSONDecodeError as exc:
        print(f"error: --timm-kwargs/--preprocess must be JSON: {exc}", file=sys.stderr)
        return 2
    with _client(args) as client:
        try:
            _print_json(
                client.upload_model(
                    args.file, timm_name=args.timm_name, timm_kwargs=kwargs, preprocess=preprocess
                )
            )
        except VitqApiError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    """``vitq jobs|datasets|models delete ID``: 0 when deleted, 2 with the API's reason otherwise."""
    from vitq.client import VitqApiError

    with _client(args) as client:
        delete = {"jobs": client.delete_job, "datasets": client.delete_dataset, "models": client.delete_model}
        try:
            delete[args.resource](args.id)
        except VitqApiError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(f"deleted {args.id}", file=sys.stderr)
    return 0


def _add_delete(subparsers: argparse._SubParsersAction, resource: str, helptext: str) -> None:
    p = subparsers.add_parser("delete", help=helptext)
    p.add_argument("id")
    _client_args(p)
    p.set_defaults(func=cmd_delete, resource=resource)


def cmd_results(args: argparse.Namespace) -> int:
    from vitq.client import VitqApiError

    with _client(args) as client:
        try:
            rows = client.results(
                model=args.model, w_bits=args.w_bits, a_bits=args.a_bits, method=args.method
            )
        except VitqApiError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    _print_json(rows)
    return 0


# -- wiring ----------------------------------------------------------------------------------------


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="API base URL (default $VITQ_URL or http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="default $VITQ_API_KEY or $VITQ_DATA_DIR/local-api-key")


def add_client_commands(subparsers: argparse._SubParsersAction) -> None:
    jobs = subparsers.add_parser("jobs", help="jobs through the REST API").add_subparsers(
        dest="jobs_command", required=True
    )
    p = jobs.add_parser("submit", help="submit a quantization job")
    p.add_argument("--model", default="fmnist-vit-tiny", help="built-in id, uploaded model id, or JSON")
    add_bits_or_target_arguments(p, eval_flag="--evaluation")
    p.add_argument("--method", default="isvit")
    p.add_argument("--preset", default="auto", choices=["auto", "paper", "quick", "smoke"],
                   help="auto (default): paper on a GPU worker, quick on a CPU one")
    p.add_argument("--calibration", "--calib", default="fashion-mnist:train:1024")
    p.add_argument("--evaluation", "--eval", default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--calib-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--webhook-url", default=None)
    p.add_argument("--idempotency-key", default=None)
    p.add_argument("--wait", action="store_true", help="poll until the job ends, showing progress")
    p.add_argument("--timeout", type=float, default=None)
    _client_args(p)
    p.set_defaults(func=cmd_jobs_submit)
    for name, func, helptext in (
        ("status", cmd_jobs_status, "print a job"),
        ("wait", cmd_jobs_wait, "wait for a job, showing progress"),
    ):
        p = jobs.add_parser(name, help=helptext)
        p.add_argument("job_id")
        if name == "wait":
            p.add_argument("--timeout", type=float, default=None)
        _client_args(p)
        p.set_defaults(func=func)
    p = jobs.add_parser("download", help="download a job's artifacts (sha256-checked)")
    p.add_argument("job_id")
    p.add_argument("--out", default=".", help="directory")
    p.add_argument("--name", default=None, help="one artifact (default: all)")
    _client_args(p)
    p.set_defaults(func=cmd_jobs_download)
    _add_delete(jobs, "jobs", "delete a job (cancelled first if unfinished) and its artifacts")
    _add_resource_commands(subparsers)


def _add_resource_commands(subparsers: argparse._SubParsersAction) -> None:
    datasets = subparsers.add_parser("datasets", help="datasets through the REST API").add_subparsers(
        dest="datasets_command", required=True
    )
    p = datasets.add_parser("upload", help="upload an .npz or an ImageFolder .zip/.tar/.tar.gz")
    p.add_argument("file")
    _client_args(p)
    p.set_defaults(func=cmd_datasets_upload)
    _add_delete(datasets, "datasets", "delete a dataset (refused while a queued or running job uses it)")

    models = subparsers.add_parser("models", help="models through the REST API").add_subparsers(
        dest="models_command", required=True
    )
    p = models.add_parser("upload", help="upload a safetensors checkpoint with its timm name and kwargs")
    p.add_argument("file")
    p.add_argument("--timm-name", required=True)
    p.add_argument("--timm-kwargs", default="{}", help="JSON object")
    p.add_argument("--preprocess", default=None, help="JSON object (mean, std, input_size, …)")
    _client_args(p)
    p.set_defaults(func=cmd_models_upload)
    _add_delete(models, "models", "delete an uploaded model (refused while a queued or running job uses it)")

    p = subparsers.add_parser("results", help="compare finished runs (FP vs quantized top-1)")
    p.add_argument("--model")
    p.add_argument("--w-bits", type=int)
    p.add_argument("--a-bits", type=int)
    p.add_argument("--method")
    _client_args(p)
    p.set_defaults(func=cmd_results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vitq", description="vitq client commands")
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
