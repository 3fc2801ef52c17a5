"""Fixtures for the service tests: a throwaway PostgreSQL database, a Redis db number, an
in-process API (FastAPI TestClient) with two tenants, and helpers to run real processes.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from service.db import dispose_all, session_scope
from service.keys import create_key
from service.settings import Settings

PG_ADMIN_URL = os.environ.get("VITQ_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("VITQ_TEST_REDIS_URL", "redis://127.0.0.1:6379")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    name = f"vitq_test_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)  # survives a restart
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    dispose_all()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A Redis db number of its own (queues are named per test as well)."""
    import redis

    db = int(os.environ.get("VITQ_TEST_REDIS_DB", "13"))
    url = f"{REDIS_URL}/{db}"
    redis.Redis.from_url(url).ping()
    return url


@pytest.fixture(scope="session")
def migrated_pg(pg_url: str) -> str:
    import migrations

    migrations.upgrade(pg_url)
    return pg_url


@dataclass
class Service:
    settings: Settings
    client: object  # fastapi.testclient.TestClient
    key_a: str
    key_b: str


def make_settings(data_dir: Path, database_url: str | None = None, **overrides: object) -> Settings:
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        queue=f"vitq-test-{secrets.token_hex(3)}",
        **overrides,
    )


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, migrated_pg: str) -> Iterator[Service]:
    """The API in-process over the real PostgreSQL; broker: filesystem (messages just accumulate)."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    data_dir = tmp_path_factory.mktemp("service")
    settings = make_settings(data_dir, migrated_pg, max_upload_bytes=16 * 1024 * 1024)
    with session_scope(migrated_pg) as session:
        key_a = create_key(session, tenant_name=f"tenant-a-{secrets.token_hex(3)}").key
        key_b = create_key(session, tenant_name=f"tenant-b-{secrets.token_hex(3)}").key
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield Service(settings, client, key_a, key_b)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def vitq_command(*args: str) -> list[str]:
    """The `vitq` CLI (vitq/cli.py, which mounts the service verbs), run with this interpreter."""
    return [sys.executable, "-m", "vitq.cli", *args]


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    out = open(log, "wb")  # noqa: SIM115 - closed when the process is stopped
    return subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class WebhookReceiver(BaseHTTPRequestHandler):
    """Records POSTs; answers with the queued ``statuses`` first, then 200."""

    statuses: list[int] = []
    received: list[tuple[dict, bytes]] = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(type(self).statuses.pop(0) if type(self).statuses else 200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    WebhookReceiver.statuses, WebhookReceiver.received = [], []
    server = HTTPServer(("127.0.0.1", 0), WebhookReceiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", WebhookReceiver
    server.shutdown()
