"""Jobs whose worker died: re-queued while attempts remain, failed after. Never left ``running``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select, update

from api.persistence.db import session_scope
from api.persistence.settings import Settings
from api.persistence.tables import Job, JobErrorCode, JobEvent, JobStatus, utcnow

log = logging.getLogger("vitq.worker")


def reap_stale_jobs(settings: Settings, enqueue: Callable[[str], None]) -> dict[str, list[str]]:
    """One pass. ``enqueue(job_id)`` sends the task again for re-queued jobs."""
    now = utcnow()
    stale = now - timedelta(seconds=settings.stale_after_s)
    requeued: list[str] = []
    failed: list[str] = []
    with session_scope(settings.resolved_database_url) as session:
        candidates = session.execute(
            select(Job.id, Job.attempts, Job.cancel_requested).where(
                Job.status == JobStatus.RUNNING.value, Job.heartbeat_at < stale
            )
        ).all()
        for job_id, attempts, cancel_requested in candidates:
            base = update(Job).where(
                Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.heartbeat_at < stale
            )
            if cancel_requested:
                values = dict(
                    status=JobStatus.CANCELLED.value,
                    error_code=JobErrorCode.CANCELLED.value,
                    error_message="cancelled (its worker stopped responding)",
                    finished_at=now,
                    updated_at=now,
                )
                if session.execute(base.values(**values)).rowcount:
                    session.add(JobEvent(job_id=job_id, kind="cancelled", message=values["error_message"]))
                    failed.append(job_id)
            elif attempts >= settings.max_attempts:
                message = f"worker lost {attempts} time(s); giving up after {settings.max_attempts} attempts"
                values = dict(
                    status=JobStatus.FAILED.value,
                    error_code=JobErrorCode.WORKER_LOST.value,
                    error_message=message,
                    finished_at=now,
                    updated_at=now,
                )
                if session.execute(base.values(**values)).rowcount:
                    session.add(JobEvent(job_id=job_id, kind="failed", message=message))
                    failed.append(job_id)
            else:
                values = dict(status=JobStatus.QUEUED.value, worker=None, updated_at=now)
                if session.execute(base.values(**values)).rowcount:
                    session.add(
                        JobEvent(
                            job_id=job_id, kind="requeued", message=f"heartbeat stopped (attempt {attempts})"
                        )
                    )
                    requeued.append(job_id)
    for job_id in requeued:
        try:
            enqueue(job_id)
        except Exception:
            log.exception("could not re-enqueue %s; the next pass retries", job_id)
    if requeued or failed:
        log.warning("reaper: re-queued %s, ended %s", requeued, failed)
    return {"requeued": requeued, "ended": failed}


class Reaper:
    """Runs ``reap_stale_jobs`` at worker start and then every ``reaper_interval_s``."""

    def __init__(self, settings: Settings, enqueue: Callable[[str], None]) -> None:
        self.settings = settings
        self.enqueue = enqueue
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vitq-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while True:
            try:
                reap_stale_jobs(self.settings, self.enqueue)
            except Exception:
                log.exception("reaper pass failed")
            if self._stop.wait(self.settings.reaper_interval_s):
                return
