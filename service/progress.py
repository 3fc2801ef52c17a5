"""Progress a person can read: percent and an ETA that is shown only once it means something.

Why: a job's first steps come after model loading and the FP evaluation, so ``elapsed × remaining /
done`` measured from the job's start said "eta 146479s" on the first step. The rate is measured from
the first step seen, and no ETA is given until a few percent of the steps and a few seconds of them
have passed. The worker (``progress`` of ``GET /v1/jobs/{id}``) and the CLI bars use this one rule.
"""

from __future__ import annotations

import time
from collections.abc import Callable

MIN_FRACTION = 0.02
"""No ETA before 2 % of the steps are done..."""
MIN_STEPS = 3
"""...nor before 3 steps..."""
MIN_SECONDS = 3.0
"""...nor before 3 s of steps: a rate from fewer says nothing about the rest."""


class EtaEstimator:
    """Feed it ``(done, total)``; it answers the seconds left, or ``None`` while that means nothing."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._first: tuple[float, int] | None = None

    def update(self, done: int, total: int) -> float | None:
        now = self._clock()
        if not total or done <= 0:
            return None
        if self._first is None or done < self._first[1]:
            self._first = (now, done)
            return None
        t0, d0 = self._first
        steps, seconds = done - d0, now - t0
        if done < max(MIN_STEPS, MIN_FRACTION * total) or steps <= 0 or seconds < MIN_SECONDS:
            return None
        return round(seconds * (total - done) / steps, 1)


def percent(done: int, total: int) -> float | None:
    return round(100.0 * done / total, 1) if total else None
