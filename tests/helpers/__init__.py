"""What the service tests share: database and Redis addresses, settings and the in-process service,
starting and stopping real processes, a webhook receiver, and assertions for the end-to-end tests.
Fixtures stay in ``conftest.py``; everything a test imports is here.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx

from service.settings import Settings

PG_ADMIN_URL = os.environ.get("VITQ_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("VITQ_TEST_REDIS_URL", "redis://127.0.0.1:6379")
REPO = Path(__file__).resolve().parents[2]


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


def wait_for(predicate: Callable[[], bool], *, timeout: float, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def assert_checkpoint_reproduces_report(checkpoint: Path, data: Path, report: dict[str, Any]) -> None:
    """`vitq evaluate` on the downloaded checkpoint gives the report's top-1, exactly."""
    out = subprocess.run(
        [sys.executable, "-m", "vitq.cli", "evaluate", str(checkpoint), "--data", str(data)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads(out.stdout.strip().splitlines()[-1])
    assert metrics["n"] == report["quant"]["n"]
    assert metrics["top1"] == report["quant"]["top1"], (metrics, report["quant"])
