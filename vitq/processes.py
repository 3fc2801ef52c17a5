"""The service's child processes: a free local port to start one on, and stopping them politely first,
then their whole process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def terminate_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM (Celery warm shutdown), then SIGKILL the whole group. A job cut short is re-queued by
    the reaper when a worker next runs (its heartbeat stops)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
