"""Job rows → ``JobPublic`` and tenant-scoped job lookup (shared by the job and artifact routes)."""

from __future__ import annotations

import re

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api.errors import ApiError, echo, not_found
from api.schemas import JobPublic, WebhookDelivery, WebhookPublic
from service.tables import Job, JobEvent

JOB_CURSOR = re.compile(r"^job_[0-9a-f]{24}$")
"""A page cursor is the last job id of the previous page (``service.tables.new_id``: 24 hex digits)."""


def check_cursor(cursor: str) -> str:
    """400 for a cursor this API did not hand out (``garbage`` gave an empty page, ``zzzz`` the first)."""
    if not JOB_CURSOR.match(cursor):
        raise ApiError(400, "invalid_cursor", f"cursor {echo(cursor)} is not one this API returned as next_cursor")
    return cursor


def get_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))
    if job is None:
        raise not_found("job", job_id)
    return job


def reread_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    """The row as it is now in the database (``session.refresh`` raised "Could not refresh instance", a
    500, when a concurrent DELETE had removed it): 404 when it is gone."""
    job = session.scalar(
        select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id).execution_options(populate_existing=True)
    )
    if job is None:
        raise not_found("job", job_id)
    return job


def lock_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    """Lock the job row for the caller's transaction with a no-op UPDATE (a row lock on PostgreSQL, the
    write lock on SQLite) and read it again: a second DELETE waits for the first, then finds no row (404)."""
    locked = session.execute(
        update(Job).where(Job.id == job_id, Job.tenant_id == tenant_id).values(updated_at=Job.updated_at)
        .execution_options(synchronize_session=False)
    ).rowcount
    if not locked:
        raise not_found("job", job_id)
    return reread_job(session, tenant_id=tenant_id, job_id=job_id)


def job_public(session: Session, job: Job) -> JobPublic:
    request = job.request
    webhook = None
    if job.webhook_url:
        events = session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job.id, JobEvent.kind == "webhook")
            .order_by(JobEvent.id)
        ).all()
        deliveries = [
            WebhookDelivery(
                attempt=int((e.data or {}).get("attempt", i + 1)),
                at=e.at,
                ok=bool((e.data or {}).get("ok")),
                status_code=(e.data or {}).get("status_code"),
                error=(e.data or {}).get("error"),
            )
            for i, e in enumerate(events)
        ]
        webhook = WebhookPublic(url=job.webhook_url, deliveries=deliveries)
    progress = dict(job.progress) if job.progress else None
    return JobPublic(
        id=job.id,
        status=job.status,
        model=request["model"],
        w_bits=request.get("w_bits"),
        a_bits=request.get("a_bits"),
        target=request.get("target"),
        method=request["method"],
        preset=request["preset"],
        calibration=job.calibration,
        evaluation=job.evaluation,
        options=request.get("options") or {},
        config=job.config,
        progress=progress,
        error={"code": job.error_code, "message": job.error_message or ""} if job.error_code else None,
        result=job.result,
        attempts=job.attempts,
        cancel_requested=job.cancel_requested,
        webhook=webhook,
        artifacts_expired=bool(job.artifacts_expired),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        links={"self": f"/v1/jobs/{job.id}", "artifacts": f"/v1/jobs/{job.id}/artifacts"},
    )
