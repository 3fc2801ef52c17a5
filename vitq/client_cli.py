"""Client verbs of the ``vitq`` CLI: jobs, datasets, models, results, through the REST API
(``vitq.client``). Waiting shows one live progress bar on a terminal, plain lines otherwise.

Output: a short human summary on a terminal; JSON with ``--json`` or whenever stdout is not a terminal
(``vitq.summaries.wants_json``), so scripts that read the JSON keep working. Failures raise; ``vitq.cli``
turns them into one line and an exit status (``vitq.cli_errors``).

``vitq.cli`` calls ``add_client_commands(subparsers)``; ``python -m vitq.client_cli`` runs the same
verbs on their own. Nothing here imports torch: ``vitq jobs …`` starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from vitq.cli_args import METHODS, PRESETS, add_bits_or_target_arguments, add_output_arguments, given, target_fields
from vitq.cli_errors import CliError, ExitCode, WaitTimeout, did_you_mean
from vitq.summaries import datasets_table, events_table, job_summary, jobs_table, print_json, wants_json

FMNIST_REF = re.compile(r"^fashion-mnist:(train|test)(?::(\d+))?$")
LOCAL_SUFFIXES = (".npz", ".zip", ".tar", ".tar.gz", ".tgz")


def _client(args: argparse.Namespace):  # noqa: ANN202
    from vitq.client import Client

    return Client(args.url, api_key=args.api_key)


def _wait(client: Any, job_id: str, timeout: float | None) -> dict[str, Any]:
    from vitq.client import JobWaitTimeout
    from vitq.progress import JobProgress

    try:
        with JobProgress(job_id) as show:
            return client.wait(job_id, timeout=timeout, on_progress=show)
    except JobWaitTimeout as exc:
        raise WaitTimeout(job_id, exc.job["status"], exc.timeout,
                          (exc.job.get("progress") or {}).get("percent")) from None
    except KeyboardInterrupt:
        raise CliError(f"interrupted; job {job_id} keeps running on the server: `vitq jobs wait {job_id}` "
                       f"to follow it again, `vitq jobs cancel {job_id}` to stop it", ExitCode.INTERRUPTED) from None


def _report(client: Any, job: dict[str, Any]) -> dict[str, Any] | None:
    """report.json of a succeeded job, for the summary's facts the job body lacks; None if unavailable."""
    from vitq.client import VitqApiError

    if job["status"] != "succeeded" or job.get("artifacts_expired"):
        return None
    try:
        return client._request("GET", f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    except (VitqApiError, ValueError):
        return None


def _show_job(client: Any, job: dict[str, Any], args: argparse.Namespace) -> None:
    if wants_json(args):
        print_json(job)
    else:
        print(job_summary(job, _report(client, job)))


def _finished_code(job: dict[str, Any]) -> int:
    return ExitCode.OK if job["status"] in ("queued", "running", "succeeded") else ExitCode.JOB_FAILED


# -- jobs ------------------------------------------------------------------------------------------


def _parse_model(text: str) -> Any:
    if not text.lstrip().startswith("{"):
        return text
    try:
        model = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"--model is not valid JSON ({exc.msg} at column {exc.colno}); give a model id, or a "
                       """JSON object like '{"timm_name": "vit_tiny_patch16_224", "timm_kwargs": {...}}'""") from None
    if not isinstance(model, dict):
        raise CliError("--model JSON must be an object with timm_name (and timm_kwargs)")
    return model


def _looks_local(ref: str) -> bool:
    return ref.endswith(LOCAL_SUFFIXES) or "/" in ref or ref.startswith(".") or Path(ref).exists()


def _data_ref(client: Any, ref: str | None, flag: str, *, quiet: bool) -> str | None:
    """A data flag as the API takes it: ``fashion-mnist:…`` and dataset ids as they are; a local file
    uploaded first (skipped when this tenant already has a dataset with its sha256)."""
    if ref is None or FMNIST_REF.match(ref) or not _looks_local(ref):
        return ref
    path = Path(ref)
    if path.is_dir():
        raise CliError(f"{flag} {ref} is a directory: pack it first (`tar czf data.tar.gz -C {ref} .`) and pass "
                       "the archive, which `vitq jobs submit` uploads")
    if not path.is_file():
        raise CliError(f"{flag} {ref}: no such file (give an uploaded dataset id, fashion-mnist:train[:N] / "
                       "fashion-mnist:test[:N], or a local .npz / .zip / .tar / .tar.gz to upload)")
    dataset, uploaded = _upload(client, path, quiet=quiet)
    verb = "uploaded" if uploaded else "already uploaded (same sha256), reusing"
    print(f"{flag} {path.name}: {verb} dataset {dataset['id']} ({dataset['n']} images)", file=sys.stderr)
    return dataset["id"]


def _upload(client: Any, path: Path, *, quiet: bool) -> tuple[dict[str, Any], bool]:
    from tqdm import tqdm

    size = path.stat().st_size
    show = not quiet and sys.stderr.isatty()
    with tqdm(total=size, unit="B", unit_scale=True, desc=f"upload {path.name}", disable=not show,
              file=sys.stderr, leave=False) as bar:
        return client.ensure_dataset(path, on_bytes=bar.update)


def _calibration_note(job: dict[str, Any], asked: str, dataset_n: dict[str, int]) -> str | None:
    """Say so when the preset uses fewer calibration images than were asked for."""
    used = (job.get("config") or {}).get("calib_size")
    match = FMNIST_REF.match(asked)
    n = int(match.group(2)) if match and match.group(2) else dataset_n.get(job.get("calibration", ""))
    if isinstance(used, int) and n and used < n:
        return (f"note: calibration has {n} images; preset {job.get('preset')} uses {used} of them "
                "(--calib-size to use more)")
    return None


def _explain_unknown(client: Any, exc: Any) -> None:
    """Add "did you mean" to the API's unknown-model / unknown-dataset refusals."""
    match = re.search(r"unknown (model|dataset) '([^']+)'", exc.message)
    if exc.status != 422 or not match:
        return
    kind, name = match.groups()
    try:
        if kind == "model":
            names = [m["id"] for m in client.list_models()["data"]]
        else:
            names = [d["id"] for d in client.list_datasets()] + ["fashion-mnist:train", "fashion-mnist:test"]
    except Exception:  # noqa: BLE001 - a hint only; the refusal itself is what matters
        return
    exc.message += did_you_mean(name, names)


def cmd_jobs_submit(args: argparse.Namespace) -> int:
    from vitq.client import VitqApiError

    model = _parse_model(args.model)
    options = given(
        {"iters": args.iters, "calib_size": args.calib_size, "batch_size": args.batch_size, "seed": args.seed}
    )
    with _client(args) as client:
        calibration = _data_ref(client, args.calibration, "--calib", quiet=args.quiet)
        evaluation = _data_ref(client, args.evaluation, "--eval", quiet=args.quiet)
        body: dict[str, Any] = {"model": model, "method": args.method, "preset": args.preset,
                                "calibration": calibration, "options": options}
        # The API checks the combination (fixed bits or a target, not both; a target needs evaluation data).
        body.update(given({"w_bits": args.w_bits, "a_bits": args.a_bits, "evaluation": evaluation,
                           "webhook_url": args.webhook_url}))
        target = target_fields(args)
        if target:
            body["target"] = target
        try:
            job = client.submit_job(idempotency_key=args.idempotency_key, **body)
        except VitqApiError as exc:
            _explain_unknown(client, exc)
            raise
        dataset_n = {}
        if calibration != args.calibration:
            dataset_n = {d["id"]: d["n"] for d in client.list_datasets() if d["id"] == calibration}
        if note := _calibration_note(job, args.calibration, dataset_n):
            print(note, file=sys.stderr)
        if args.wait:
            print(f"submitted job {job['id']}", file=sys.stderr)
            job = _wait(client, job["id"], args.timeout)
            _show_job(client, job, args)
        elif wants_json(args):
            print_json(job)
        else:
            print(job["id"])
            print(f"queued; follow it with `vitq jobs wait {job['id']}`", file=sys.stderr)
    return _finished_code(job) if args.wait else ExitCode.OK


def cmd_jobs_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _show_job(client, client.get_job(args.job_id), args)
    return ExitCode.OK


def cmd_jobs_wait(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = _wait(client, args.job_id, args.timeout)
        _show_job(client, job, args)
    return ExitCode.OK if job["status"] == "succeeded" else ExitCode.JOB_FAILED


def cmd_jobs_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.list_jobs(status=args.status, limit=args.limit, cursor=args.cursor)
    if wants_json(args):
        print_json(page)
        return ExitCode.OK
    print(jobs_table(page["data"]) if page["data"] else "no jobs" + (f" {args.status}" if args.status else ""))
    if page.get("next_cursor"):
        print(f"more: vitq jobs list --cursor {page['next_cursor']}", file=sys.stderr)
    return ExitCode.OK


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel_job(args.job_id)
    if wants_json(args):
        print_json(job)
    else:
        state = job["status"] if job["status"] != "running" else "running; cancel requested, it stops within seconds"
        print(f"job {job['id']} {state}")
    return ExitCode.OK


def cmd_jobs_events(args: argparse.Namespace) -> int:
    with _client(args) as client:
        events = client.job_events(args.job_id)
    if wants_json(args):
        print_json(events)
    else:
        print(events_table(events))
    return ExitCode.OK


def cmd_jobs_download(args: argparse.Namespace) -> int:
    """``--out`` is a directory, made if missing; every artifact (or ``--name``'s) keeps its name there."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file; --out names a directory (the artifacts keep their names)")
    out.mkdir(parents=True, exist_ok=True)
    with _client(args) as client:
        names = [args.name] if args.name else [a["name"] for a in client.list_artifacts(args.job_id)]
        paths = [client.download_artifact(args.job_id, name, out / name) for name in names]
    for path in paths:
        print(path)
    return ExitCode.OK


# -- datasets, models, results ---------------------------------------------------------------------


def cmd_datasets_upload(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"{args.file}: no such file (an .npz, or an ImageFolder .zip / .tar / .tar.gz)")
    with _client(args) as client:
        if args.force:
            dataset, uploaded = client.upload_dataset(path), True
        else:
            dataset, uploaded = _upload(client, path, quiet=args.quiet)
    if not uploaded:
        print(f"already uploaded (same sha256): dataset {dataset['id']} (--force to upload again)", file=sys.stderr)
    if wants_json(args):
        print_json(dataset)
    else:
        print(datasets_table([dataset]))
    return ExitCode.OK


def cmd_datasets_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        datasets = client.list_datasets()
    if wants_json(args):
        print_json(datasets)
    else:
        print(datasets_table(datasets) if datasets else "no datasets: `vitq datasets upload FILE`")
    return ExitCode.OK


def cmd_models_upload(args: argparse.Namespace) -> int:
    try:
        kwargs = json.loads(args.timm_kwargs)
        preprocess = json.loads(args.preprocess) if args.preprocess else None
    except json.JSONDecodeError as exc:
        raise CliError(f"--timm-kwargs/--preprocess must be JSON objects ({exc.msg} at column {exc.colno})") from None
    with _client(args) as client:
        model = client.upload_model(args.file, timm_name=args.timm_name, timm_kwargs=kwargs, preprocess=preprocess)
    if wants_json(args):
        print_json(model)
    else:
        print(f"model {model['id']} ({model['timm_name']}) uploaded: `vitq jobs submit --model {model['id']} …`")
    return ExitCode.OK


def cmd_delete(args: argparse.Namespace) -> int:
    """``vitq jobs|datasets|models delete ID``: 0 when deleted, 2 with the API's reason otherwise."""
    with _client(args) as client:
        delete = {"jobs": client.delete_job, "datasets": client.delete_dataset, "models": client.delete_model}
        delete[args.resource](args.id)
    print(f"deleted {args.id}", file=sys.stderr)
    return ExitCode.OK


def _add_delete(subparsers: argparse._SubParsersAction, resource: str, helptext: str) -> None:
    p = subparsers.add_parser("delete", help=helptext)
    p.add_argument("id")
    _client_args(p)
    p.set_defaults(func=cmd_delete, resource=resource)


def cmd_results(args: argparse.Namespace) -> int:
    with _client(args) as client:
        rows = client.results(model=args.model, w_bits=args.w_bits, a_bits=args.a_bits, method=args.method)
    print_json(rows)
    return ExitCode.OK


# -- wiring ----------------------------------------------------------------------------------------


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="API base URL (default $VITQ_URL or http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="default $VITQ_API_KEY, else $VITQ_DATA_DIR/local-api-key "
                                                   "(written by `vitq serve`)")


def add_client_commands(subparsers: argparse._SubParsersAction) -> dict[str, argparse._SubParsersAction]:
    """Add ``jobs``, ``datasets``, ``models`` and ``results``; returns the verb groups by name so that
    other modules (``vitq models pull/import/list``) can add their verbs to the same group."""
    jobs = subparsers.add_parser("jobs", help="submit, follow, list, cancel and download jobs").add_subparsers(
        dest="jobs_command", required=True, metavar="VERB"
    )
    p = jobs.add_parser("submit", help="submit a quantization job (local data files are uploaded)")
    p.add_argument("--model", default="fmnist-vit-tiny", help="built-in id, uploaded model id, or JSON")
    add_bits_or_target_arguments(p, eval_flag="--eval")
    p.add_argument("--method", default="isvit", choices=METHODS)
    p.add_argument("--preset", default="auto", choices=PRESETS,
                   help="auto (default): paper on a GPU worker, quick on a CPU one")
    p.add_argument("--calib", "--calibration", dest="calibration", default="fashion-mnist:train:1024",
                   help="calibration data: fashion-mnist:train[:N], an uploaded dataset id, or a local "
                        ".npz/.zip/.tar/.tar.gz (uploaded, or reused when already uploaded)")
    p.add_argument("--eval", "--evaluation", "--data", dest="evaluation", default=None,
                   help="evaluation data (labelled), the same forms as --calib")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--calib-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--webhook-url", default=None)
    p.add_argument("--idempotency-key", default=None)
    p.add_argument("--wait", action="store_true", help="follow the job to its end with a progress bar, then "
                                                       "summarise it (exit 1 if it failed)")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: give up waiting after this many "
                                                               "seconds (exit 3; the job keeps running)")
    p.add_argument("--quiet", action="store_true", help="no upload progress bar")
    add_output_arguments(p)
    _client_args(p)
    p.set_defaults(func=cmd_jobs_submit)

    p = jobs.add_parser("list", help="your jobs, newest first")
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--cursor", default=None, help="the next page (printed under a full page)")
    add_output_arguments(p)
    _client_args(p)
    p.set_defaults(func=cmd_jobs_list)

    for name, func, helptext in (
        ("status", cmd_jobs_status, "a job's state, progress and result"),
        ("wait", cmd_jobs_wait, "follow a job to its end with a progress bar (exit 1 if it failed)"),
        ("cancel", cmd_jobs_cancel, "cancel a job (a running one stops within seconds)"),
        ("events", cmd_jobs_events, "a job's event log: submitted, started, requeued, finished"),
    ):
        p = jobs.add_parser(name, help=helptext)
        p.add_argument("job_id")
        if name == "wait":
            p.add_argument("--timeout", type=float, default=None,
                           help="give up waiting after this many seconds (exit 3; the job keeps running)")
        add_output_arguments(p)
        _client_args(p)
        p.set_defaults(func=func)
    p = jobs.add_parser("download", help="download a job's artifacts into a directory (sha256-checked)")
    p.add_argument("job_id")
    p.add_argument("--out", default=".", help="directory (made if missing); files keep their names")
    p.add_argument("--name", default=None, help="one artifact, e.g. report.html (default: all)")
    _client_args(p)
    p.set_defaults(func=cmd_jobs_download)
    _add_delete(jobs, "jobs", "delete a job (cancelled first if unfinished) and its artifacts")
    return {"jobs": jobs, **_add_resource_commands(subparsers)}


def _add_resource_commands(subparsers: argparse._SubParsersAction) -> dict[str, argparse._SubParsersAction]:
    datasets = subparsers.add_parser("datasets", help="upload, list and delete datasets").add_subparsers(
        dest="datasets_command", required=True, metavar="VERB"
    )
    p = datasets.add_parser("upload", help="upload an .npz or an ImageFolder .zip/.tar/.tar.gz")
    p.add_argument("file")
    p.add_argument("--force", action="store_true", help="upload even if a dataset with the same sha256 exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_output_arguments(p)
    _client_args(p)
    p.set_defaults(func=cmd_datasets_upload)
    p = datasets.add_parser("list", help="your datasets")
    add_output_arguments(p)
    _client_args(p)
    p.set_defaults(func=cmd_datasets_list)
    _add_delete(datasets, "datasets", "delete a dataset (refused while a queued or running job uses it)")

    models = subparsers.add_parser("models", help="upload and delete models").add_subparsers(
        dest="models_command", required=True, metavar="VERB"
    )
    p = models.add_parser("upload", help="upload a safetensors checkpoint with its timm name and kwargs")
    p.add_argument("file")
    p.add_argument("--timm-name", required=True)
    p.add_argument("--timm-kwargs", default="{}", help="JSON object")
    p.add_argument("--preprocess", default=None, help="JSON object (mean, std, input_size, …)")
    add_output_arguments(p)
    _client_args(p)
    p.set_defaults(func=cmd_models_upload)
    _add_delete(models, "models", "delete an uploaded model (refused while a queued or running job uses it)")

    p = subparsers.add_parser("results", help="compare finished runs (FP vs quantized top-1), as JSON")
    p.add_argument("--model")
    p.add_argument("--w-bits", type=int)
    p.add_argument("--a-bits", type=int)
    p.add_argument("--method")
    _client_args(p)
    p.set_defaults(func=cmd_results)
    return {"datasets": datasets, "models": models}


def main(argv: list[str] | None = None) -> int:
    from vitq.cli import run_parsed

    parser = argparse.ArgumentParser(prog="vitq", description="vitq client commands")
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    return run_parsed(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
