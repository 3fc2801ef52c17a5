"""Real processes for the fault tests: `vitq api` (uvicorn) and `vitq worker` (Celery) over the real
PostgreSQL and a Redis, each in its own process group so a test can SIGKILL one and start it again.

Why a module of its own: every fault test needs the same start / kill -9 / restart / inspect moves,
with a per-test queue and tenant, and the job rows read straight from the database (the truth).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from service.db import session_scope
from service.keys import create_key
from service.tables import Artifact, Job, JobEvent, Report
from tests.helpers import start, stop, vitq_command, wait_for, wait_http
from vitq.client import Client
from vitq.processes import free_port

FAST_JOB: dict[str, Any] = {
    "model": "fmnist-vit-tiny",
    "w_bits": 4,
    "a_bits": 4,
    "method": "repq",
    "preset": "smoke",
    "calibration": "fashion-mnist:train:16",
    "options": {"calib_size": 16},
}
"""About 10 s on one CPU core: calibration only (RepQ-ViT has no reconstruction stages)."""


def isvit_job(iters: int) -> dict[str, Any]:
    """An I&S-ViT job whose stage 1 lasts about ``iters`` × 1 s (12 blocks × ~0.09 s per step)."""
    return FAST_JOB | {"method": "isvit", "options": {"calib_size": 16, "iters": iters}}


FOREVER_JOB = isvit_job(100_000)
"""Stays in stage 1 until it is killed, cancelled or timed out."""


@dataclass
class Stack:
    """One API and any number of named workers sharing a database, a broker, a queue and a store."""

    env: dict[str, str]
    data_dir: Path
    database_url: str
    key: str
    url: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start_api(self, name: str = "api") -> None:
        """Start (or restart, on the same port, so clients keep their URL) the API process."""
        port = int(self.url.rsplit(":", 1)[1]) if self.url else free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.procs[name] = start(
            vitq_command("api", "--host", "127.0.0.1", "--port", str(port)), self.env, self.log(name)
        )
        wait_http(f"{self.url}/healthz", proc=self.procs[name])

    def start_worker(self, name: str = "worker", **env: str) -> subprocess.Popen:
        extra = {f"VITQ_{k.upper()}": str(v) for k, v in env.items()}
        proc = start(vitq_command("worker"), self.env | extra, self.log(name))
        self.procs[name] = proc
        wait_for(lambda: "ready." in self.log(name).read_text(errors="replace"), timeout=120, what=f"{name} ready")
        return proc

    def kill(self, name: str) -> None:
        """``kill -9`` the whole process group (Celery's main process and its pool child)."""
        proc = self.procs[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            stop(proc)
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the pool child, if the main process left it
            except ProcessLookupError:
                pass

    def log(self, name: str) -> Path:
        return self.data_dir / f"{name}.log"

    def client(self, timeout: float = 60) -> Client:
        return Client(self.url, api_key=self.key, timeout=timeout)

    # -- the database, read directly: it is the truth ------------------------------------------------

    def row(self, job_id: str) -> Job:
        with session_scope(self.database_url) as session:
            job = session.get(Job, job_id)
            assert job is not None, f"job {job_id} lost"
            session.expunge(job)
            return job

    def events(self, job_id: str) -> list[tuple[str, str]]:
        with session_scope(self.database_url) as session:
            rows = session.execute(
                select(JobEvent.kind, JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
            ).all()
        return [(kind, message) for kind, message in rows]

    def outputs(self, job_id: str) -> tuple[int, int]:
        """(artifact rows, report rows) of a job: (4, 1) for a job that succeeded exactly once (model.onnx included)."""
        with session_scope(self.database_url) as session:
            artifacts = session.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id))
            reports = session.scalar(select(func.count()).select_from(Report).where(Report.job_id == job_id))
        return int(artifacts or 0), int(reports or 0)

    def wait_stage(self, job_id: str, prefix: str, timeout: float = 180) -> None:
        def reached() -> bool:
            row = self.row(job_id)
            assert row.status in ("queued", "running"), (row.status, row.error_code, row.error_message)
            return row.status == "running" and str((row.progress or {}).get("stage", "")).startswith(prefix)

        wait_for(reached, timeout=timeout, what=f"job {job_id} reaching {prefix}", poll=0.2)

    def wait_finished(self, job_id: str, timeout: float = 300) -> Job:
        wait_for(
            lambda: self.row(job_id).status in ("succeeded", "failed", "cancelled"),
            timeout=timeout,
            what=f"job {job_id} to finish",
            poll=0.5,
        )
        return self.row(job_id)


def drop_queue_keys(redis_url: str, queue: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"*{queue}*"):
        client.delete(key)
    client.close()


def make_stack(data_dir: Path, database_url: str, broker_url: str, **env: str) -> Stack:
    key = _new_key(database_url)
    base = {k: v for k, v in os.environ.items() if not k.startswith("VITQ_")}
    base |= {
        "VITQ_DATABASE_URL": database_url,
        "VITQ_BROKER_URL": broker_url,
        "VITQ_QUEUE": f"vitq-fault-{secrets.token_hex(3)}",
        "VITQ_DATA_DIR": str(data_dir),
        "VITQ_HEARTBEAT_INTERVAL_S": "1",
        "VITQ_PROGRESS_INTERVAL_S": "0.5",
    }
    base |= {f"VITQ_{k.upper()}": str(v) for k, v in env.items()}
    return Stack(env=base, data_dir=data_dir, database_url=database_url, key=key)


def _new_key(database_url: str) -> str:
    with session_scope(database_url) as session:
        return create_key(session, tenant_name=f"fault-{secrets.token_hex(4)}").key


@pytest.fixture
def stack_factory(tmp_path: Path, migrated_pg: str, redis_url: str) -> Iterator:
    """``stack_factory(broker_url=None, **VITQ_settings) -> Stack``; every process is stopped after the
    test, its queue keys dropped, and the logs' tails printed (shown when the test fails)."""
    made: list[tuple[Stack, str]] = []

    def factory(broker_url: str | None = None, **env: str) -> Stack:
        data_dir = tmp_path / f"stack{len(made)}"
        data_dir.mkdir()
        stack = make_stack(data_dir, migrated_pg, broker_url or redis_url, **env)
        made.append((stack, broker_url or redis_url))
        return stack

    started = time.monotonic()
    yield factory
    for stack, broker in made:
        stack.stop_all()
        try:
            drop_queue_keys(broker, stack.env["VITQ_QUEUE"])
        except Exception:  # a private broker already gone
            pass
        for name in stack.procs:
            print(f"--- {name}.log (tail)\n" + stack.log(name).read_text(errors="replace")[-2500:])
    print(f"stack lifetime {time.monotonic() - started:.1f} s")
