"""Service verbs for the ``vitq`` CLI: serve, api, worker, migrate, keys, jobs, datasets, models, results.

``vitq.cli`` calls ``add_service_commands(subparsers)``; ``python -m vitq.service_cli`` runs the
same verbs on their own.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from vitq.processes import terminate_process_group

LOCAL_TENANT = "local"
KEY_FILE = "local-api-key"


def _settings():  # noqa: ANN202 - imported lazily so `vitq quantize` does not pay for service imports
    from service.settings import get_settings

    get_settings.cache_clear()
    return get_settings()


def _at_least_one(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _set_data_dir(path: str | None) -> None:
    if path:
        os.environ["VITQ_DATA_DIR"] = str(Path(path).resolve())


# -- processes -------------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    import migrations

    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrations.upgrade(settings.resolved_database_url)
    print(f"database at head: {_redact(settings.resolved_database_url)}")
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app

    settings = _settings()
    if args.workers > 1:  # separate processes import the app themselves: settings come from VITQ_*
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # /metrics then sums every process
            import tempfile

            os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="vitq-metrics-")
        uvicorn.run("api.app:create_app", factory=True, host=args.host, port=args.port,
                    log_level=args.log_level, workers=args.workers)
    else:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.main import run_worker

    if args.threads is not None:
        os.environ["VITQ_TORCH_THREADS"] = str(args.threads)
    return run_worker(_settings(), concurrency=args.concurrency, loglevel=args.log_level.upper())


def cmd_serve(args: argparse.Namespace) -> int:
    """Embedded default: SQLite + filesystem broker + local store, the API and one worker process."""
    import uvicorn

    import migrations
    from api.app import create_app

    _set_data_dir(args.data_dir or os.environ.get("VITQ_DATA_DIR") or ".vitq")
    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrations.upgrade(settings.resolved_database_url)
    key, created = ensure_local_key(settings)
    print(f"vitq serve: data in {settings.data_dir.resolve()}", flush=True)
    print(f"API key ({'new' if created else 'from'} {settings.data_dir / KEY_FILE}): {key}", flush=True)
    print(f"API: http://{args.host}:{args.port}  (docs at /docs)", flush=True)
    worker_cmd = [sys.executable, "-m", "vitq.service_cli", "worker", "--log-level", args.log_level]
    # Its own process group, so stopping `serve` can take the Celery pool child down with it.
    worker = subprocess.Popen(worker_cmd, env=os.environ.copy(), start_new_session=True)

    def _stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    except KeyboardInterrupt:
        pass
    finally:
        terminate_process_group(worker)
    return 0


def ensure_local_key(settings: Any) -> tuple[str, bool]:
    """The embedded default's key: reuse ``<data_dir>/local-api-key`` while it works, else make one."""
    from service.db import session_scope
    from service.keys import authenticate, create_key

    path = settings.data_dir / KEY_FILE
    with session_scope(settings.resolved_database_url) as session:
        if path.is_file():
            key = path.read_text().strip()
            if authenticate(session, key=key) is not None:
                return key, False
        new = create_key(session, tenant_name=LOCAL_TENANT)
    path.write_text(new.key + "\n")
    path.chmod(0o600)
    return new.key, True


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


# -- keys ------------------------------------------------------------------------------------------


def cmd_keys_create(args: argparse.Namespace) -> int:
    import migrations
    from service.db import session_scope
    from service.keys import create_key

    settings = _settings()
    if settings.database_url is None:  # embedded default: make sure the SQLite schema exists
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        migrations.upgrade(settings.resolved_database_url)
    with session_scope(settings.resolved_database_url) as session:
        new = create_key(session, tenant_name=args.tenant)
    if args.json:
        print(
            json.dumps(
                {
                    "key_id": new.key_id,
                    "key": new.key,
                    "tenant": new.tenant_name,
                    "webhook_secret": new.webhook_secret,
                }
            )
        )
    else:
        print(new.key)
        print(
            f"key id {new.key_id}, tenant {new.tenant_name} ({new.tenant_id}); "
            "stored hashed: this is the only time it is shown",
            file=sys.stderr,
        )
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from service.db import session_scope
    from service.keys import revoke_key

    settings = _settings()
    with session_scope(settings.resolved_database_url) as session:
        revoked = revoke_key(session, key_or_id=args.key)
    print("revoked" if revoked else "no such live key", file=sys.stderr)
    return 0 if revoked else 1


# -- jobs (through the REST API) -------------------------------------------------------------------


def _client(args: argparse.Namespace):  # noqa: ANN202
    from vitq.client import Client

    return Client(args.url, api_key=args.api_key)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def progress_line(job: dict[str, Any]) -> str:
    p = job.get("progress") or {}
    parts = [job["status"]]
    if p.get("stage"):
        parts.append(f"{p['stage']}")
    if p.get("unit"):
        parts.append(
            f"{p['unit']} {p.get('index', 0) + 1 if p.get('index') is not None else ''}/{p.get('total')}"
        )
    if p.get("percent") is not None:
        parts.append(f"{p['percent']:.0f}%")
    if p.get("eta_seconds") is not None:
        parts.append(f"eta {p['eta_seconds']:.0f}s")
    return " · ".join(str(x) for x in parts)


def _wait(client: Any, job_id: str, timeout: float | None) -> dict[str, Any]:
    last = ""

    def show(job: dict[str, Any]) -> None:
        nonlocal last
        line = progress_line(job)
        if line != last:
            print(f"[{job_id}] {line}", file=sys.stderr, flush=True)
            last = line

    return client.wait(job_id, timeout=timeout, on_progress=show)


def cmd_jobs_submit(args: argparse.Namespace) -> int:
    from vitq.client import VitqApiError

    model: Any = args.model
    if args.model.startswith("{"):
        model = json.loads(args.model)
    options = {
        k: v
        for k, v in {
            "iters": args.iters,
            "calib_size": args.calib_size,
            "batch_size": args.batch_size,
            "seed": args.seed,
        }.items()
        if v is not None
    }
    body: dict[str, Any] = {
        "model": model,
        "w_bits": args.w_bits,
        "a_bits": args.a_bits,
        "method": args.method,
        "preset": args.preset,
        "calibration": args.calibration,
        "options": options,
    }
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


def add_service_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="embedded default: API + one worker, SQLite, no servers")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", default=None, help="default $VITQ_DATA_DIR or ./.vitq")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("api", help="production API process (settings from VITQ_* variables)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (one per core)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_api)

    p = subparsers.add_parser("worker", help="production worker: one process per GPU (CUDA_VISIBLE_DEVICES)")
    p.add_argument("--concurrency", type=_at_least_one, default=1)
    p.add_argument("--threads", type=_at_least_one, help="PyTorch threads per job (default: usable CPUs / concurrency)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_worker)

    p = subparsers.add_parser("migrate", help="apply database migrations (alembic upgrade head)")
    p.set_defaults(func=cmd_migrate)

    keys = subparsers.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    p = keys.add_parser("create", help="create an API key for a tenant and print it")
    p.add_argument("--tenant", required=True)
    p.add_argument("--json", action="store_true", help="print key, key id, tenant and webhook secret as JSON")
    p.set_defaults(func=cmd_keys_create)
    p = keys.add_parser("revoke", help="revoke an API key (by key id or the key itself)")
    p.add_argument("key")
    p.set_defaults(func=cmd_keys_revoke)

    jobs = subparsers.add_parser("jobs", help="jobs through the REST API").add_subparsers(
        dest="jobs_command", required=True
    )
    p = jobs.add_parser("submit", help="submit a quantization job")
    p.add_argument("--model", default="fmnist-vit-tiny", help="built-in id, uploaded model id, or JSON")
    p.add_argument("--w-bits", type=int, required=True)
    p.add_argument("--a-bits", type=int, required=True)
    p.add_argument("--method", default="isvit")
    p.add_argument("--preset", default="quick")
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
    _add_resource_commands(subparsers)

    from vitq.loadtest_cli import add_loadtest_command

    add_loadtest_command(subparsers)


def _add_resource_commands(subparsers: argparse._SubParsersAction) -> None:
    datasets = subparsers.add_parser("datasets", help="datasets through the REST API").add_subparsers(
        dest="datasets_command", required=True
    )
    p = datasets.add_parser("upload", help="upload an .npz or an ImageFolder .zip/.tar/.tar.gz")
    p.add_argument("file")
    _client_args(p)
    p.set_defaults(func=cmd_datasets_upload)

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

    p = subparsers.add_parser("results", help="compare finished runs (FP vs quantized top-1)")
    p.add_argument("--model")
    p.add_argument("--w-bits", type=int)
    p.add_argument("--a-bits", type=int)
    p.add_argument("--method")
    _client_args(p)
    p.set_defaults(func=cmd_results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vitq", description="vitq service commands")
    add_service_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
