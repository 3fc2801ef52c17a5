"""Servers a fault test may take down: a private redis-server (so the shared one is untouched) and the
system PostgreSQL cluster, restarted for real with a guarantee that it is running again at teardown.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import PG_ADMIN_URL
from vitq.processes import free_port


@dataclass
class PrivateRedis:
    """A real redis-server on a free port, without persistence: a restart loses every message."""

    port: int
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 - the server keeps the descriptor
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        import redis

        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis(port=self.port, socket_timeout=1).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.kill()
        self.start()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(port=free_port(), log=tmp_path / "redis.log")
    server.start()
    yield server
    server.kill()


@dataclass
class SystemPostgres:
    """The local PostgreSQL cluster, driven by ``pg_ctlcluster`` (Debian's wrapper)."""

    version: str
    name: str = "main"

    def _ctl(self, action: str, *extra: str) -> None:
        cmd = ["pg_ctlcluster", "--skip-systemctl-redirect", self.version, self.name, action, *extra]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def stop(self) -> None:
        self._ctl("stop", "-m", "fast")  # ends sessions at once, as a crash or failover would

    def start(self) -> None:
        self._ctl("start")

    def online(self) -> bool:
        out = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True, timeout=30).stdout
        return any(
            line.split()[:2] == [self.version, self.name] and "online" in line for line in out.splitlines()
        )


@pytest.fixture
def system_postgres() -> Iterator[SystemPostgres]:
    """Skipped unless the tests use the local cluster and pg_ctlcluster can drive it."""
    configs = Path("/etc/postgresql")
    local = "@127.0.0.1:" in PG_ADMIN_URL or "@localhost:" in PG_ADMIN_URL
    if not local or shutil.which("pg_ctlcluster") is None or not configs.is_dir():
        pytest.skip("needs the local PostgreSQL cluster and pg_ctlcluster")
    cluster = SystemPostgres(version=sorted(p.name for p in configs.iterdir())[-1])
    if not cluster.online():
        pytest.skip("the local PostgreSQL cluster is not online")
    try:
        yield cluster
    finally:
        if not cluster.online():
            cluster.start()
