"""Jobs whose worker died: re-queued while attempts remain, failed after. Never left ``running``.
Jobs whose broker message was lost (Redis restarted without persistence): sent again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import lifecycle
from service.db import session_scope
from service.settings import Settings
from service.tables import Job, JobErrorCode, JobEvent, JobStatus, utcnow
from worker.broker_inventory import pending_job_ids
from worker.periodic import PeriodicPass

log = logging.getLogger("vitq.worker")


def reap_stale_jobs(
    settings: Settings, enqueue: Callable[[str], None], notify: Callable[[str], None] | None = None
) -> dict[str, list[str]]:
    """One pass. ``enqueue(job_id)`` sends the task again for re-queued jobs; ``notify(job_id)`` queues
    the job-end webhook of each job the pass ended that has one (its worker, which would have sent it,
    is gone), after the commit."""
    now = utcnow()
    stale = now - timedelta(seconds=settings.stale_after_s)
    requeued: list[str] = []
    failed: list[str] = []
    ended_with_webhook: list[str] = []
    with session_scope(settings.resolved_database_url) as session:
        candidates = session.execute(
            select(Job.id, Job.attempts, Job.cancel_requested, Job.started_at, Job.webhook_url).where(
                Job.status == JobStatus.RUNNING.value, Job.heartbeat_at < stale
            )
        ).all()
        over_time = now - timedelta(seconds=settings.job_soft_time_limit_s)
        for job_id, attempts, cancel_requested, started_at, webhook_url in candidates:
            ending = _ending(settings, attempts, cancel_requested, started_at, over_time)
            if ending is not None:
                status, code, event, message = ending
                if lifecycle.end_abandoned(
                    session,
                    job_id=job_id,
                    attempt=attempts,
                    stale_before=stale,
                    status=status,
                    code=code,
                    event=event,
                    message=message,
                ):
                    failed.append(job_id)
                    if webhook_url:
                        ended_with_webhook.append(job_id)
            elif lifecycle.requeue(session, job_id=job_id, attempt=attempts, stale_before=stale):
                requeued.append(job_id)
    _send_all(enqueue, requeued, "run task")
    if notify is not None:
        _send_all(notify, ended_with_webhook, "webhook")
    if requeued or failed:
        log.warning("reaper: re-queued %s, ended %s", requeued, failed)
    return {"requeued": requeued, "ended": failed}


def _send_all(send: Callable[[str], None], job_ids: list[str], what: str) -> None:
    """Send after the commit. A re-queue that fails leaves the row ``queued`` for the lost-message pass
    to send again; a webhook that fails to queue is logged (the job's end is recorded either way)."""
    for job_id in job_ids:
        try:
            send(job_id)
        except Exception:
            log.exception("could not send the %s of %s", what, job_id)


def _ending(
    settings: Settings, attempts: int, cancel_requested: bool, started_at: datetime | None, over_time: datetime
) -> tuple[JobStatus, JobErrorCode, str, str] | None:
    """How a job whose worker is gone ends (status, error code, event kind, message), or None to re-queue it.

    A cancel asked for is honoured; a job past its time limit was killed by Celery's hard limit (or hung),
    and running it again would only hit the same limit; after ``max_attempts`` lost workers it fails.
    """
    if cancel_requested:
        return JobStatus.CANCELLED, JobErrorCode.CANCELLED, "cancelled", "cancelled (its worker stopped responding)"
    if started_at is not None and started_at < over_time:
        message = f"the job ran past the time limit of {settings.job_soft_time_limit_s} s"
        return JobStatus.FAILED, JobErrorCode.TIMEOUT, "failed", message
    if attempts >= settings.max_attempts:
        message = f"worker lost {attempts} time(s); giving up after {settings.max_attempts} attempts"
        return JobStatus.FAILED, JobErrorCode.WORKER_LOST, "failed", message
    return None


def requeue_lost_messages(
    settings: Settings, enqueue: Callable[[str], None], pending: set[str] | None
) -> list[str]:
    """Send again the ``queued`` jobs that have no message in the broker (``pending``, from
    ``worker.broker_inventory``) and have waited ``lost_message_after_s``. Two reapers never both send:
    the row's ``updated_at`` is compare-and-set first. A duplicate message is harmless anyway (the
    claim is a compare-and-set), it only costs a no-op delivery."""
    if pending is None:
        return []
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.lost_message_after_s)
    resent: list[str] = []
    with session_scope(settings.resolved_database_url) as session:
        waiting = session.execute(
            select(Job.id, Job.attempts, Job.updated_at).where(
                Job.status == JobStatus.QUEUED.value, Job.updated_at < cutoff
            )
        ).all()
        lost = {job_id: (attempts, updated_at) for job_id, attempts, updated_at in waiting if job_id not in pending}
        ours = _sent_to_queue(session, list(lost), settings.queue)
        for job_id, (attempts, updated_at) in lost.items():
            if job_id in ours and lifecycle.mark_resent(
                session, job_id=job_id, attempt=attempts, updated_at=updated_at
            ):
                resent.append(job_id)
    _send_all(enqueue, resent, "run task")
    if resent:
        log.warning("reaper: broker had lost %d queued job(s); sent again: %s", len(resent), resent)
    return resent


def _sent_to_queue(session: Session, job_ids: list[str], queue: str) -> set[str]:
    """The jobs the API sent to ``queue`` (its ``created`` event says where). Another queue's jobs (another
    deployment or GPU pool on the same database) are its own reapers' business."""
    if not job_ids:
        return set()
    rows = session.execute(
        select(JobEvent.job_id, JobEvent.data).where(JobEvent.job_id.in_(job_ids), JobEvent.kind == "created")
    ).all()
    return {job_id for job_id, data in rows if isinstance(data, dict) and data.get("queue") == queue}


def reaper(
    settings: Settings, enqueue: Callable[[str], None], notify: Callable[[str], None] | None = None
) -> PeriodicPass:
    """``reap_stale_jobs`` and ``requeue_lost_messages`` at worker start and then every ``reaper_interval_s``."""

    def one_pass() -> None:
        reap_stale_jobs(settings, enqueue, notify)
        requeue_lost_messages(settings, enqueue, pending_job_ids(settings))

    return PeriodicPass("reaper", one_pass, settings.reaper_interval_s)
