"""Server verbs of the ``vitq`` CLI: serve, api, worker, webhooks, migrate, keys, tenants. They run the service's own
processes and talk to its database directly.

``vitq.cli`` calls ``add_server_commands(subparsers)``; ``python -m vitq.server_cli`` runs the same
verbs on their own. The verbs that talk to a running service over HTTP are in ``vitq.client_cli``.
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
    from api.app import create_app
    from api.http_server import serve

    settings = _settings()
    if args.workers > 1:  # separate processes import the app themselves: settings come from VITQ_*
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # /metrics then sums every process
            import tempfile

            os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="vitq-metrics-")
        serve("api.app:create_app", settings, factory=True, host=args.host, port=args.port,
              log_level=args.log_level, workers=args.workers)
    else:
        serve(create_app(settings), settings, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.main import run_worker

    if args.threads is not None:
        os.environ["VITQ_TORCH_THREADS"] = str(args.threads)
    return run_worker(_settings(), concurrency=args.concurrency, loglevel=args.log_level.upper())


def cmd_webhooks(args: argparse.Namespace) -> int:
    from worker.main import run_webhook_worker

    return run_webhook_worker(_settings(), concurrency=args.concurrency, loglevel=args.log_level.upper())


def cmd_serve(args: argparse.Namespace) -> int:
    """Embedded default: SQLite + filesystem broker + local store, the API and one worker process."""
    import migrations
    from api.app import create_app
    from api.http_server import serve

    _set_data_dir(args.data_dir or os.environ.get("VITQ_DATA_DIR") or ".vitq")
    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrations.upgrade(settings.resolved_database_url)
    key, created = ensure_local_key(settings)
    print(f"vitq serve: data in {settings.data_dir.resolve()}", flush=True)
    print(f"API key ({'new' if created else 'from'} {settings.data_dir / KEY_FILE}): {key}", flush=True)
    print(f"API: http://{args.host}:{args.port}  (docs at /docs)", flush=True)
    worker_cmd = [sys.executable, "-m", "vitq.server_cli", "worker", "--log-level", args.log_level]
    # Its own process group, so stopping `serve` can take the Celery pool child down with it.
    worker = subprocess.Popen(worker_cmd, env=os.environ.copy(), start_new_session=True)
    # Webhooks have their own queue and consumer, so a long job never holds another job's notification.
    webhooks_cmd = [sys.executable, "-m", "vitq.server_cli", "webhooks", "--log-level", args.log_level]
    webhooks = subprocess.Popen(webhooks_cmd, env=os.environ.copy(), start_new_session=True)

    def _stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        serve(create_app(settings), settings, host=args.host, port=args.port, log_level=args.log_level)
    except KeyboardInterrupt:
        pass
    finally:
        terminate_process_group(worker)
        terminate_process_group(webhooks)
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


# -- tenants ---------------------------------------------------------------------------------------

LIMIT_OPTIONS = {
    "rps": ("rate_limit_rps", float),
    "burst": ("rate_limit_burst", int),
    "max_active_jobs": ("max_active_jobs", int),
    "max_storage_bytes": ("max_storage_bytes", int),
}


def cmd_tenants_limits(args: argparse.Namespace) -> int:
    """Show a tenant's limits, or set (a number) or reset (``default``) some of them."""
    from sqlalchemy import select

    from service.db import session_scope
    from service.quotas import limits_for, set_limits
    from service.tables import Tenant

    settings = _settings()
    changes: dict[str, float | int | None] = {}
    for option, (column, kind) in LIMIT_OPTIONS.items():
        value = getattr(args, option)
        if value is not None:
            try:
                changes[column] = None if value == "default" else kind(value)
            except ValueError:
                print(f"error: --{option.replace('_', '-')} must be a number or 'default'", file=sys.stderr)
                return 2
    with session_scope(settings.resolved_database_url) as session:
        tenant = session.scalar(select(Tenant).where(Tenant.name == args.tenant))
        if tenant is None:
            print(f"error: no tenant {args.tenant!r}", file=sys.stderr)
            return 1
        try:
            set_limits(session, tenant, **changes)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        session.flush()
        effective = limits_for(settings, tenant)
        own = {column: getattr(tenant, column) for column, _ in LIMIT_OPTIONS.values()}
    print(json.dumps({"tenant": args.tenant, "effective": effective.__dict__, "own": own}))
    return 0


# -- wiring ----------------------------------------------------------------------------------------


def add_server_commands(subparsers: argparse._SubParsersAction) -> None:
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

    p = subparsers.add_parser("webhooks", help="deliver webhooks from their own queue (never behind jobs)")
    p.add_argument("--concurrency", type=_at_least_one, default=None, help="default $VITQ_WEBHOOK_CONCURRENCY")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_webhooks)

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

    tenants = subparsers.add_parser("tenants", help="tenants").add_subparsers(dest="tenants_command", required=True)
    p = tenants.add_parser("limits", help="show or set a tenant's rate limit and quotas ('default' resets one)")
    p.add_argument("--tenant", required=True)
    p.add_argument("--rps", help="requests per second per API key (0: none)")
    p.add_argument("--burst", help="requests at once above the rate")
    p.add_argument("--max-active-jobs", dest="max_active_jobs", help="queued + running jobs (0: none)")
    p.add_argument("--max-storage-bytes", dest="max_storage_bytes", help="bytes of uploads (0: none)")
    p.set_defaults(func=cmd_tenants_limits)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vitq", description="vitq server commands")
    add_server_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
