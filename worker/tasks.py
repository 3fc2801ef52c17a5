"""The job task: a thin wrapper that takes an id and calls ``worker.runner``; when the job ended it
queues the webhook on the webhook queue (``worker.webhook_tasks`` delivers it, in another process)."""

from __future__ import annotations

import logging

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded

from service.queue import RUN_JOB, send_webhook
from service.settings import get_settings
from worker.runner import run_job as run_job_now

log = logging.getLogger("vitq.worker")


@shared_task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str | None:
    settings = get_settings()
    status = run_job_now(settings, job_id, soft_timeout=SoftTimeLimitExceeded)
    if status is not None:
        _maybe_webhook(job_id)
    return status


def _maybe_webhook(job_id: str) -> None:
    from service.db import session_scope
    from service.tables import Job

    settings = get_settings()
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(Job, job_id)
        url = job.webhook_url if job is not None else None
    if url:
        try:
            send_webhook(settings, job_id)
        except Exception:  # the job's end is recorded; a lost notification must not fail the task
            log.exception("could not queue the webhook of job %s", job_id)
