"""Stopping the service's child processes: politely first, then their whole process group."""

from __future__ import annotations

import os
import signal
import subprocess


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
