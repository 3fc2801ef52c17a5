"""Shared assertions for the end-to-end tests."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


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
