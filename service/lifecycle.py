"""The job's state machine: every transition of a job row, and nothing else changes a job's state.

::

    create ──▶ queued ──claim──▶ running ──succeed──▶ succeeded
                 │  ▲              │ │ │
   cancel_queued │  └──requeue─────┘ │ └──fail / timeout──▶ failed
                 ▼                   └──cancelled─────────▶ cancelled
             cancelled          (heartbeat, progress and request_cancel keep it running)

Each transition is one conditional ``UPDATE … WHERE id = :id AND status = :expected AND attempts =
:attempt`` (a worker's transitions also match its name) and returns whether it won; the caller owns
the session and commits. A worker holds a :class:`Lease` (job, worker, attempt) from :func:`claim`;
once a reaper re-queued the job or another worker took it over, every transition with the old lease
loses, so a late worker can neither overwrite the row nor record a second set of artifacts
(:func:`succeed` adds the artifact rows only when its UPDATE won, in the same transaction).

Events (``job_events``) are written by the transition that won, in the same transaction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from core.finite_json import finite_json
from service.tables import Artifact, Job, JobErrorCode, JobEvent, JobStatus, Report, utcnow


@dataclass(frozen=True)
class Lease:
    """What a worker won with :func:`claim`: the job, under this worker's name, at this attempt."""

    job_id: str
    worker: str
    attempt: int


def _guarded(
    session: Session,
    job_id: str,
    *,
    status: JobStatus | tuple[JobStatus, ...],
    attempt: int,
    values: dict[str, Any],
    also: Iterable[ColumnElement[bool]] = (),
) -> bool:
    """The one UPDATE every transition runs: ``values`` only where the row is still as expected."""
    statuses = (status,) if isinstance(status, JobStatus) else status
    statement = (
        update(Job)
        .where(Job.id == job_id, Job.status.in_([s.value for s in statuses]), Job.attempts == attempt, *also)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(session.execute(statement).rowcount)


def _held(lease: Lease) -> list[ColumnElement[bool]]:
    return [Job.worker == lease.worker]


def _event(session: Session, job_id: str, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
    session.add(JobEvent(job_id=job_id, kind=kind, message=message, data=data))


# -- the API's transitions --------------------------------------------------------------------------


def create(session: Session, job: Job, *, queue: str) -> bool:
    """Insert ``job`` as ``queued`` at attempt 0. The queue is recorded in the ``created`` event, so a
    reaper re-sends only its own queue's jobs when the broker loses them."""
    job.status = JobStatus.QUEUED.value
    job.attempts = 0
    session.add(job)
    _event(session, job.id, "created", "job queued", {"queue": queue})
    return True


def fail_unsent(session: Session, *, job_id: str, message: str) -> bool:
    """``queued → failed`` when the message could not be sent: the job must not stay queued for ever."""
    now = utcnow()
    won = _guarded(
        session,
        job_id,
        status=JobStatus.QUEUED,
        attempt=0,
        values=dict(
            status=JobStatus.FAILED.value,
            error_code=JobErrorCode.BROKER_UNAVAILABLE.value,
            error_message=message,
            finished_at=now,
            updated_at=now,
        ),
    )
    if won:
        _event(session, job_id, "failed", message)
    return won


def cancel_queued(session: Session, *, job_id: str, attempt: int) -> bool:
    """``queued → cancelled``: nobody runs it yet, so the cancel is final at once."""
    now = utcnow()
    won = _guarded(
        session,
        job_id,
        status=JobStatus.QUEUED,
        attempt=attempt,
        values=dict(
            status=JobStatus.CANCELLED.value,
            cancel_requested=True,
            error_code=JobErrorCode.CANCELLED.value,
            error_message="cancelled before it started",
            finished_at=now,
            updated_at=now,
        ),
    )
    if won:
        _event(session, job_id, "cancelled", "cancelled while queued")
    return won


def request_cancel(session: Session, *, job_id: str, attempt: int) -> bool:
    """A running job is asked to stop; its worker sees the flag at its next heartbeat and ends it
    with :func:`cancelled` (or a reaper does, if the worker is gone)."""
    won = _guarded(
        session,
        job_id,
        status=JobStatus.RUNNING,
        attempt=attempt,
        values=dict(cancel_requested=True, updated_at=utcnow()),
    )
    if won:
        _event(session, job_id, "cancel_requested", "cancel requested")
    return won


# -- the worker's transitions -----------------------------------------------------------------------


def claim(
    session: Session, *, job_id: str, worker: str, max_attempts: int, stale_before: datetime
) -> Lease | None:
    """``queued → running`` (or take over a ``running`` job whose heartbeat stopped before
    ``stale_before``), as attempt ``attempts + 1``. ``None`` when taken, finished, cancelled or out of
    attempts."""
    row = session.execute(select(Job.status, Job.attempts, Job.heartbeat_at).where(Job.id == job_id)).first()
    if row is None:
        return None
    status, attempts, heartbeat_at = row
    if status == JobStatus.QUEUED.value:
        expected = JobStatus.QUEUED
        also: list[ColumnElement[bool]] = []
    elif status == JobStatus.RUNNING.value and heartbeat_at is not None and heartbeat_at < stale_before:
        expected = JobStatus.RUNNING
        also = [Job.heartbeat_at < stale_before]
    else:
        return None
    now = utcnow()
    won = _guarded(
        session,
        job_id,
        status=expected,
        attempt=attempts,
        values=dict(
            status=JobStatus.RUNNING.value,
            attempts=attempts + 1,
            worker=worker,
            heartbeat_at=now,
            started_at=now,
            updated_at=now,
            progress=None,
        ),
        also=[Job.cancel_requested.is_(False), Job.attempts < max_attempts, *also],
    )
    if not won:
        return None
    _event(session, job_id, "started", f"started (attempt {attempts + 1})")  # the worker's name stays private
    return Lease(job_id=job_id, worker=worker, attempt=attempts + 1)


def heartbeat(session: Session, lease: Lease) -> bool:
    """The worker is alive. ``False``: the job is no longer this worker's (re-queued, taken, ended)."""
    return _guarded(
        session,
        lease.job_id,
        status=JobStatus.RUNNING,
        attempt=lease.attempt,
        values=dict(heartbeat_at=utcnow()),
        also=_held(lease),
    )


def cancel_is_requested(session: Session, job_id: str) -> bool:
    """Read (not a transition): whether a cancel was asked for."""
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def record_progress(session: Session, lease: Lease, progress: dict[str, Any], *, new_stage: str | None = None) -> bool:
    """Store the latest progress (a NaN loss as null); ``new_stage`` also logs a ``stage`` event."""
    won = _guarded(
        session,
        lease.job_id,
        status=JobStatus.RUNNING,
        attempt=lease.attempt,
        values=dict(progress=finite_json(progress), updated_at=utcnow()),
        also=_held(lease),
    )
    if won and new_stage is not None:
        _event(session, lease.job_id, "stage", new_stage, {"stage": new_stage})
    return won


def _end(
    session: Session,
    lease: Lease,
    status: JobStatus,
    *,
    code: str | None,
    message: str,
    extra: dict[str, Any] | None = None,
) -> bool:
    now = utcnow()
    won = _guarded(
        session,
        lease.job_id,
        status=JobStatus.RUNNING,
        attempt=lease.attempt,
        values=dict(
            status=status.value,
            error_code=code,
            error_message=message if status is not JobStatus.SUCCEEDED else None,
            finished_at=now,
            updated_at=now,
            heartbeat_at=now,
            **(extra or {}),
        ),
        also=_held(lease),
    )
    if won:
        _event(session, lease.job_id, status.value, message)
    return won


def cancelled(session: Session, lease: Lease) -> bool:
    """``running → cancelled``: the worker stopped at a cancel request."""
    return _end(session, lease, JobStatus.CANCELLED, code=JobErrorCode.CANCELLED.value, message="cancelled by request")


def fail(session: Session, lease: Lease, *, code: str, message: str) -> bool:
    """``running → failed`` with an error code (``JobErrorCode`` or a core error's code)."""
    return _end(session, lease, JobStatus.FAILED, code=code, message=message)


def timeout(session: Session, lease: Lease, *, limit_s: int) -> bool:
    """``running → failed`` (``timeout``): the job ran past its soft time limit."""
    message = f"the job ran past the time limit of {limit_s} s"
    return _end(session, lease, JobStatus.FAILED, code=JobErrorCode.TIMEOUT.value, message=message)


def succeed(
    session: Session,
    lease: Lease,
    *,
    summary: dict[str, Any],
    progress: dict[str, Any] | None,
    artifacts: list[Artifact],
    report: Report,
    hold_blobs: Callable[[Session], None] | None = None,
) -> bool:
    """``running → succeeded`` and, only if that UPDATE won, the artifact and report rows, in the same
    transaction. A worker whose attempt is no longer current records nothing. ``hold_blobs`` (see
    ``service.blob_gc.hold``) runs after the job row is won and before the rows are added, so a blob
    shared with a job being deleted is kept, or stored again, for these rows.

    Every number written is finite or null (``core.finite_json``): PostgreSQL's JSON columns refuse
    ``-Infinity``, and the API could not return it."""
    progress = {**(progress or {}), "percent": 100.0, "eta_seconds": 0.0}
    won = _end(
        session,
        lease,
        JobStatus.SUCCEEDED,
        code=None,
        message="artifacts stored",
        extra=dict(result=finite_json(summary), progress=finite_json(progress)),
    )
    if won:
        if hold_blobs is not None:
            hold_blobs(session)
        session.add_all([*artifacts, _finite_report(report)])
    return won


def _finite_report(report: Report) -> Report:
    """The report row with its float columns and its JSON finite or null."""
    for column in Report.__table__.columns:
        value = getattr(report, column.key, None)
        if isinstance(value, float) and not math.isfinite(value):
            setattr(report, column.key, None)
    report.report = finite_json(report.report)
    return report


# -- the reaper's transitions -----------------------------------------------------------------------


def requeue(session: Session, *, job_id: str, attempt: int, stale_before: datetime) -> bool:
    """``running → queued``: the worker's heartbeat stopped before ``stale_before``; attempts remain."""
    won = _guarded(
        session,
        job_id,
        status=JobStatus.RUNNING,
        attempt=attempt,
        values=dict(status=JobStatus.QUEUED.value, worker=None, updated_at=utcnow()),
        also=[Job.heartbeat_at < stale_before],
    )
    if won:
        _event(session, job_id, "requeued", f"heartbeat stopped (attempt {attempt})")
    return won


def end_abandoned(
    session: Session,
    *,
    job_id: str,
    attempt: int,
    stale_before: datetime,
    status: JobStatus,
    code: JobErrorCode,
    event: str,
    message: str,
) -> bool:
    """``running → failed | cancelled`` for a job whose worker is gone and that must not run again
    (cancel asked for, past its time limit, or out of attempts)."""
    now = utcnow()
    won = _guarded(
        session,
        job_id,
        status=JobStatus.RUNNING,
        attempt=attempt,
        values=dict(status=status.value, error_code=code.value, error_message=message, finished_at=now, updated_at=now),
        also=[Job.heartbeat_at < stale_before],
    )
    if won:
        _event(session, job_id, event, message)
    return won


def mark_resent(session: Session, *, job_id: str, attempt: int, updated_at: datetime) -> bool:
    """A ``queued`` job whose message the broker lost is sent again; compare-and-set on ``updated_at``
    first, so two reapers never both send it."""
    won = _guarded(
        session,
        job_id,
        status=JobStatus.QUEUED,
        attempt=attempt,
        values=dict(updated_at=utcnow()),
        also=[Job.updated_at == updated_at],
    )
    if won:
        _event(session, job_id, "requeued", "broker lost its message; sent again")
    return won
