"""Celery tasks: thin wrappers that take an id and call ``worker.runner`` / ``worker.webhooks``."""

from __future__ import annotations

import logging

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded

from service.queue import DELIVER_WEBHOOK, RUN_JOB, send_webhook
from service.settings import get_settings
from worker.runner import run_job as run_job_now
from worker.webhooks import WebhookDeliveryError, deliver_once

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
        send_webhook(settings, job_id)


@shared_task(name=DELIVER_WEBHOOK, bind=True, acks_late=True, ignore_result=True, max_retries=None)
def deliver_webhook(self, job_id: str) -> bool | None:  # noqa: ANN001
    settings = get_settings()
    try:
        return deliver_once(settings, job_id)
    except WebhookDeliveryError as exc:
        if self.request.retries >= settings.webhook_max_retries:
            log.warning("webhook for %s gave up after %d retries: %s", job_id, self.request.retries, exc)
            return False
        countdown = min(settings.webhook_backoff_max_s, 2 ** (self.request.retries + 1))
        raise self.retry(exc=exc, countdown=countdown) from None
