"""Start the production topology on this machine for benchmarks: `vitq api` (uvicorn) and N
`vitq worker` processes (Celery) over an existing PostgreSQL and Redis.

Why a module of its own: `vitq-loadtest` and its test both need the same real processes that
`docker compose up` runs, started and stopped reliably (process groups, a per-run queue, a fresh
tenant), without a Docker engine.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from vitq.processes import free_port, terminate_process_group
from worker.cpu_threads import usable_cpus


@dataclass
class Topology:
    url: str
    api_key: str
    database_url: str
    broker_url: str
    queue: str
    data_dir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.data_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


def _vitq(*args: str) -> list[str]:
    return [sys.executable, "-m", "vitq.server_cli", *args]


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the API exited with status {proc.returncode} before {url}/readyz answered")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url}/readyz did not answer within {timeout} s")


def _drop_queue(broker_url: str, queue: str) -> None:
    """Remove this run's Redis keys, so an aborted run leaves no messages behind."""
    if not broker_url.startswith(("redis://", "rediss://")):
        return
    import redis

    client = redis.Redis.from_url(broker_url)
    for key in client.scan_iter(match=f"*{queue}*"):
        client.delete(key)


@contextmanager
def running_topology(
    *,
    database_url: str,
    broker_url: str,
    api_workers: int = 1,
    workers: int = 1,
    data_dir: Path | None = None,
    extra_env: dict[str, str] | None = None,
    ready_timeout: float = 120.0,
) -> Iterator[Topology]:
    """Migrate, make a key for a fresh tenant, start the API and ``workers`` workers; stop them after."""
    import migrations
    from service.db import session_scope
    from service.keys import create_key

    run = secrets.token_hex(4)
    data_dir = Path(data_dir or tempfile.mkdtemp(prefix=f"vitq-load-{run}-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    queue = f"vitq-load-{run}"
    env = dict(
        os.environ,
        VITQ_DATABASE_URL=database_url,
        VITQ_BROKER_URL=broker_url,
        VITQ_QUEUE=queue,
        VITQ_DATA_DIR=str(data_dir),
        # N workers on one host share its cores; each assuming all of them is 20x slower (worker/cpu_threads.py)
        VITQ_TORCH_THREADS=str(max(1, usable_cpus() // max(1, workers))),
        # The benchmark measures capacity with one API key: the per-key rate limit and the active-job
        # quota (docs/multi-tenant.md) would measure themselves instead.
        VITQ_RATE_LIMIT_RPS="0",
        VITQ_MAX_ACTIVE_JOBS="0",
        **(extra_env or {}),
    )
    migrations.upgrade(database_url)
    with session_scope(database_url) as session:
        key = create_key(session, tenant_name=f"loadtest-{run}").key
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    topo = Topology(url, key, database_url, broker_url, queue, data_dir)
    try:
        api_cmd = _vitq("api", "--host", "127.0.0.1", "--port", str(port), "--workers", str(api_workers),
                        "--log-level", "warning")
        topo.processes["api"] = _start(api_cmd, env, data_dir / "api.log")
        for i in range(workers):
            topo.processes[f"worker-{i}"] = _start(
                _vitq("worker", "--log-level", "warning"), env, data_dir / f"worker-{i}.log"
            )
        _wait_ready(url, topo.processes["api"], ready_timeout)
        yield topo
    finally:
        for proc in topo.processes.values():
            terminate_process_group(proc, grace=15.0)
        _drop_queue(broker_url, queue)
