"""The webhook task, on its own queue (``VITQ_WEBHOOK_QUEUE``), consumed by ``vitq webhooks``.

Importing it imports no torch and no runner, so the delivery process is small and starts fast. Failed
deliveries are retried with Celery's ``retry`` and exponential backoff (up to
``VITQ_WEBHOOK_MAX_RETRIES``); a target the SSRF guard refuses, or a redirect, is not retried.
"""

from __future__ import annotations

import logging

from celery import shared_task

from service.queue import DELIVER_WEBHOOK
from service.settings import get_settings
from worker.webhooks import WebhookDeliveryError, WebhookRefused, deliver_once

log = logging.getLogger("vitq.webhooks")


@shared_task(name=DELIVER_WEBHOOK, bind=True, acks_late=True, ignore_result=True, max_retries=None)
def deliver_webhook(self, job_id: str) -> bool | None:  # noqa: ANN001
    settings = get_settings()
    try:
        return deliver_once(settings, job_id)
    except WebhookRefused as exc:
        log.warning("webhook for %s not sent: %s", job_id, exc)
        return False
    except WebhookDeliveryError as exc:
        if self.request.retries >= settings.webhook_max_retries:
            log.warning("webhook for %s gave up after %d retries: %s", job_id, self.request.retries, exc)
            return False
        countdown = min(settings.webhook_backoff_max_s, 2 ** (self.request.retries + 1))
        raise self.retry(exc=exc, countdown=countdown) from None
