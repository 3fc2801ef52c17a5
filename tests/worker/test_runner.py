"""worker/runner.py in-process over the real PostgreSQL: the claim is a compare-and-set, a stale job can
be taken over, and JobMonitor throttles progress, computes percent and ETA and honours a cancel."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select

from core import CancelledError
from service.db import session_scope
from service.progress import EtaEstimator
from service.tables import JobEvent, utcnow
from tests.helpers.factories import auth
from tests.helpers.jobs import read_job, set_job_row, submit_job
from worker.runner import JobMonitor, claim


def test_claim_is_compare_andset_job_row(service):
    job_id = submit_job(service)
    lease = claim(service.settings, job_id, "worker-1")
    assert lease is not None and (lease.worker, lease.attempt) == ("worker-1", 1)
    assert claim(service.settings, job_id, "worker-2") is None
    job = read_job(service, job_id)
    assert job["status"] == "running" and job["attempts"] == 1
    cancelled = submit_job(service)
    service.client.post(f"/v1/jobs/{cancelled}/cancel", headers=auth(service.key_a))
    assert claim(service.settings, cancelled, "worker-1") is None


def test_stale_running_job_can_be_taken_over(service):
    job_id = submit_job(service)
    assert claim(service.settings, job_id, "dead-worker")
    assert not claim(service.settings, job_id, "worker-2")
    set_job_row(service, job_id, heartbeat_at=utcnow() - timedelta(seconds=service.settings.stale_after_s + 1))
    assert claim(service.settings, job_id, "worker-2")
    assert read_job(service, job_id)["attempts"] == 2


def test_progress_is_throttled_and_has_percent_and_eta(service, monkeypatch):
    monkeypatch.setattr(service.settings, "progress_interval_s", 60.0)
    monkeypatch.setattr(service.settings, "heartbeat_interval_s", 0.2)
    job_id = submit_job(service)
    lease = claim(service.settings, job_id, "me")
    assert lease is not None
    ticks = iter(range(1, 1000))
    with JobMonitor(service.settings, lease) as monitor:
        monitor._eta = EtaEstimator(clock=lambda: float(next(ticks)))  # one second per progress event
        for i in range(50):
            monitor.progress(
                {
                    "stage": "stage1",
                    "unit": "blocks.0",
                    "index": 0,
                    "total": 12,
                    "loss": 1.0,
                    "done": i + 1,
                    "total_steps": 100,
                }
            )
        monitor.progress(
            {
                "stage": "stage2",
                "unit": "blocks.0",
                "index": 0,
                "total": 12,
                "loss": 0.5,
                "done": 60,
                "total_steps": 100,
            }
        )
        assert not monitor.should_stop()
        service.client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(service.key_a))
        for _ in range(50):
            if monitor.should_stop():
                break
            threading.Event().wait(0.1)
        assert monitor.should_stop(), "cancel did not reach should_stop()"
        with pytest.raises(CancelledError):  # a stage boundary honours the cancel as well
            monitor.progress({"stage": "evaluate_quant", "done": 0, "total_steps": 0})
    progress = read_job(service, job_id)["progress"]
    # rate from the first step seen (done=1 at t=1) to done=60 at t=51: 59 steps in 50 s, 40 to go
    assert progress["stage"] == "stage2" and progress["percent"] == 60.0
    assert progress["eta_seconds"] == pytest.approx(50 * 40 / 59, abs=0.1)
    with session_scope(service.settings.resolved_database_url) as session:
        stages = session.scalars(
            select(JobEvent.message).where(JobEvent.job_id == job_id, JobEvent.kind == "stage").order_by(JobEvent.id)
        ).all()
    assert stages == ["stage1", "stage2"]  # one write per stage change; the rest throttled


class _SoftTimeLimit(Exception):
    """Stands in for Celery's SoftTimeLimitExceeded (a signal raised wherever the job is)."""


def test_a_soft_time_limit_landing_inside_a_progress_write_still_ends_the_job_as_timeout(service, monkeypatch):
    """Seen in a clean-clone run: the signal arrived while SQLAlchemy bound a progress UPDATE's parameters,
    SQLAlchemy re-raised it as a StatementError, and the job ended ``internal_error``."""
    from sqlalchemy.exc import StatementError

    from worker import runner

    def quantization_interrupted_mid_statement(*args, **kwargs):
        try:
            raise _SoftTimeLimit()
        except _SoftTimeLimit as signal:
            raise StatementError("bind failed", "UPDATE jobs SET progress=?", {}, signal) from signal

    monkeypatch.setattr(runner, "run_quantization", quantization_interrupted_mid_statement)
    job_id = submit_job(service)
    assert runner.run_job(service.settings, job_id, soft_timeout=_SoftTimeLimit) == "failed"
    error = read_job(service, job_id)["error"]
    assert error["code"] == "timeout" and "time limit" in error["message"], error
