"""A short load run for docs/multi-tenant.md: does a tenant over its rate limit slow another tenant?

Starts two `vitq api` processes on a throwaway PostgreSQL database and Redis (127.0.0.1 only), makes two
tenants, limits the first (``--limited-rps``), then measures the second tenant's ``GET /v1/jobs`` latency
at a fixed rate: alone, and while the first floods both processes from ``--flood-threads`` threads.

    .venv/bin/python scripts/rate_limit_load.py --seconds 10 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from sqlalchemy import create_engine, select, text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


def _paced(url: str, key: str, seconds: float, rps: float, out: list[tuple[int, float]]) -> None:
    with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        start = time.monotonic()
        n = 0
        while time.monotonic() - start < seconds:
            t0 = time.perf_counter()
            status = http.get(f"{url}/v1/jobs", params={"limit": 1}).status_code
            out.append((status, time.perf_counter() - t0))
            n += 1
            delay = start + n / rps - time.monotonic()
            if delay > 0:
                time.sleep(delay)


def _flood(url: str, key: str, stop: threading.Event, out: list[int], rps: float | None) -> None:
    with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        start, n = time.monotonic(), 0
        while not stop.is_set():
            out.append(http.get(f"{url}/v1/jobs", params={"limit": 1}).status_code)
            n += 1
            if rps:
                delay = start + n / rps - time.monotonic()
                if delay > 0:
                    time.sleep(delay)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rps", type=float, default=20.0, help="the second tenant's steady rate")
    parser.add_argument("--limited-rps", type=float, default=1.0)
    parser.add_argument("--flood-threads", type=int, default=4)
    parser.add_argument("--flood-rps", type=float, default=None, help="cap the flood (default: as fast as answered)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import migrations
    from service.db import session_scope
    from service.keys import create_key
    from service.quotas import set_limits
    from service.tables import Tenant
    from vitq.processes import free_port, terminate_process_group

    name = f"vitq_rl_{secrets.token_hex(4)}"
    admin = create_engine(args.pg_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    db_url = f"{args.pg_admin_url.rsplit('/', 1)[0]}/{name}"
    procs: list[subprocess.Popen] = []
    data_dir = Path(tempfile.mkdtemp(prefix="vitq-rl-"))
    try:
        migrations.upgrade(db_url)
        with session_scope(db_url) as session:
            limited = create_key(session, tenant_name="limited")
            other = create_key(session, tenant_name="other").key
            tenant = session.scalar(select(Tenant).where(Tenant.id == limited.tenant_id))
            set_limits(session, tenant, rate_limit_rps=args.limited_rps, rate_limit_burst=2)
        env = dict(os.environ, VITQ_DATABASE_URL=db_url, VITQ_BROKER_URL=args.redis_url,
                   VITQ_QUEUE=f"vitq-rl-{secrets.token_hex(3)}", VITQ_DATA_DIR=str(data_dir))
        urls = []
        for i in range(2):
            port = free_port()
            log = open(data_dir / f"api{i}.log", "wb")  # noqa: SIM115
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "vitq.server_cli", "api", "--host", "127.0.0.1", "--port", str(port),
                 "--log-level", "warning"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            for _ in range(240):
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        warm: list[tuple[int, float]] = []
        _paced(urls[0], other, 2.0, args.rps, warm)

        alone: list[tuple[int, float]] = []
        _paced(urls[0], other, args.seconds, args.rps, alone)
        stop, flood = threading.Event(), []
        per_thread = args.flood_rps / args.flood_threads if args.flood_rps else None
        threads = [threading.Thread(target=_flood, args=(urls[i % 2], limited.key, stop, flood, per_thread))
                   for i in range(args.flood_threads)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        flood_before = len(flood)
        during: list[tuple[int, float]] = []
        _paced(urls[0], other, args.seconds, args.rps, during)
        flood_during = len(flood) - flood_before
        stop.set()
        for t in threads:
            t.join()

        def row(samples: list[tuple[int, float]]) -> dict:
            latencies = [d for _, d in samples]
            statuses: dict[int, int] = {}
            for s, _ in samples:
                statuses[s] = statuses.get(s, 0) + 1
            return {"requests": len(samples), "p50_ms": round(_pct(latencies, 0.5), 1),
                    "p99_ms": round(_pct(latencies, 0.99), 1), "max_ms": round(_pct(latencies, 1.0), 1),
                    "statuses": statuses}

        flood_statuses: dict[int, int] = {}
        for s in flood:
            flood_statuses[s] = flood_statuses.get(s, 0) + 1
        report = {
            "seconds": args.seconds, "second_tenant_rps": args.rps, "limited_rps": args.limited_rps,
            "flood_threads": args.flood_threads, "flood_rps_cap": args.flood_rps, "second_tenant_alone": row(alone),
            "second_tenant_during_flood": row(during),
            "flood": {"requests_during_measurement": flood_during,
                      "rps": round(flood_during / args.seconds, 1), "statuses": flood_statuses},
            "load_average": os.getloadavg(),
        }
        print(json.dumps(report, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        for proc in procs:
            terminate_process_group(proc)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
