"""worker/reaper.py in-process over the real PostgreSQL: a job whose heartbeat stopped is re-queued
while attempts remain, failed after, cancelled if a cancel was asked for; a live one is left alone."""

from __future__ import annotations

from datetime import timedelta

from service.tables import utcnow
from tests.helpers.jobs import read_job, set_job_row, submit_job
from worker.reaper import reap_stale_jobs
from worker.runner import claim


def test_reaper_requeues_then_fails(service):
    settings = service.settings
    old = utcnow() - timedelta(seconds=settings.stale_after_s + 5)
    hook = {"webhook_url": "http://127.0.0.1:9/hook"}  # never called here: notify only records the id
    requeue, exhausted, cancelling, alive = (submit_job(service, **hook) for _ in range(4))
    silent = submit_job(service)  # ended too, but has no webhook to send
    for job_id in (requeue, exhausted, cancelling, alive):
        assert claim(settings, job_id, "dead-worker")
    set_job_row(service, requeue, heartbeat_at=old)
    set_job_row(service, exhausted, heartbeat_at=old, attempts=settings.max_attempts)
    set_job_row(service, cancelling, heartbeat_at=old, cancel_requested=True)
    assert claim(settings, silent, "dead-worker")
    set_job_row(service, silent, heartbeat_at=old, attempts=settings.max_attempts)
    sent: list[str] = []
    notified: list[str] = []
    outcome = reap_stale_jobs(settings, sent.append, notified.append)
    assert requeue in outcome["requeued"] and sent.count(requeue) == 1
    assert {exhausted, cancelling, silent} <= set(outcome["ended"])
    # the dead worker would have queued the job-end webhook; the reaper does it for the jobs it ended
    assert {exhausted, cancelling} <= set(notified) and not {silent, requeue, alive} & set(notified)
    assert read_job(service, requeue)["status"] == "queued"
    failed = read_job(service, exhausted)
    assert failed["status"] == "failed" and failed["error"]["code"] == "worker_lost"
    assert read_job(service, cancelling)["status"] == "cancelled"
    assert read_job(service, alive)["status"] == "running"  # heartbeat fresh: left alone
    # the re-queued job can be claimed again, by anyone, and counts the attempt
    assert claim(settings, requeue, "worker-2")
    assert read_job(service, requeue)["attempts"] == 2
