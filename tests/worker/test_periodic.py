"""worker/periodic.py: the loop of the reaper and the retention pass. A pass that raises is logged and
the next one runs; the first pass may wait; stop() ends the loop at its next wait."""

from __future__ import annotations

import logging
import threading

from worker.periodic import PeriodicPass


def test_a_failing_pass_is_logged_and_the_next_one_still_runs(caplog):
    calls: list[int] = []
    third = threading.Event()

    def flaky() -> None:
        calls.append(len(calls))
        if len(calls) == 3:
            third.set()
        if len(calls) == 1:
            raise ConnectionError("database down")

    loop = PeriodicPass("test", flaky, interval_s=0.01)
    with caplog.at_level(logging.WARNING, logger="vitq.worker"):
        loop.start()
        assert third.wait(5)
        loop.stop()
        loop._thread.join(5)
    assert not loop._thread.is_alive()
    assert "test pass failed: ConnectionError: database down" in caplog.text


def test_a_first_delay_holds_the_first_pass_and_stop_during_it_runs_none():
    calls: list[int] = []
    loop = PeriodicPass("delayed", lambda: calls.append(1), interval_s=0.01, first_delay_s=30)
    loop.start()
    loop.stop()
    loop._thread.join(5)
    assert not loop._thread.is_alive() and calls == []
