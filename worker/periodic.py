"""A pass the worker runs in a daemon thread at start and then every few seconds (the reaper, the
retention pass): one loop, so that a failed pass (the database or the broker down) is logged and the
next one tries again, and stopping never waits for more than the pass in progress."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("vitq.worker")


class PeriodicPass:
    def __init__(
        self, name: str, run_pass: Callable[[], object], interval_s: float, first_delay_s: float = 0.0
    ) -> None:
        self.name, self.run_pass = name, run_pass
        self.interval_s, self.first_delay_s = interval_s, first_delay_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"vitq-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        if self.first_delay_s and self._stop.wait(self.first_delay_s):
            return
        while True:
            try:
                self.run_pass()
            except Exception as exc:  # database, broker or store down: the next pass tries again
                log.warning("%s pass failed: %s: %s", self.name, type(exc).__name__, str(exc)[:200])
            if self._stop.wait(self.interval_s):
                return
