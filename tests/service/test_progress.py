"""service/progress.py: the ETA is given only once it means something, and measured from the first step."""

from __future__ import annotations

import pytest

from service.progress import EtaEstimator, percent


def _clock(times: list[float]):
    it = iter(times)
    return lambda: next(it)


def test_no_eta_on_the_first_step_after_a_long_setup():
    """The demo's first line said "eta 146479s": the first step came after minutes of loading and
    evaluation, and the rate was taken from the job's start. The rate now starts at the first step."""
    eta = EtaEstimator(clock=_clock([600.0, 601.0, 602.0, 610.0]))
    assert eta.update(1, 4800) is None  # first step seen: no rate yet
    assert eta.update(2, 4800) is None  # too few steps, too little time
    assert eta.update(3, 4800) is None
    assert eta.update(100, 4800) == pytest.approx(10.0 * 4700 / 99, abs=0.1)  # 99 steps in 10 s


def test_no_eta_before_a_few_percent_or_a_few_seconds():
    eta = EtaEstimator(clock=_clock([0.0, 1.0, 10.0]))
    assert eta.update(1, 1000) is None
    assert eta.update(15, 1000) is None  # 1.5 % done
    assert eta.update(30, 1000) == pytest.approx(10.0 * 970 / 29, abs=0.1)


def test_unknown_total_and_restarts():
    eta = EtaEstimator(clock=_clock([0.0, 5.0, 6.0, 20.0]))
    assert eta.update(5, 0) is None  # no total: nothing to estimate
    assert eta.update(10, 100) is None  # first step seen
    assert eta.update(2, 100) is None  # the counter went back (a new stage's count): start again
    assert eta.update(12, 100) == pytest.approx(14.0 * 88 / 10, abs=0.1)
    assert percent(1, 3) == 33.3 and percent(1, 0) is None
