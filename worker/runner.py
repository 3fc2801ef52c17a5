"""Run one job: claim the row, run core with progress/heartbeat/cancel, store artifacts and report.

Plain functions over a settings object, so tests can run a job in-process and the Celery task
stays a thin wrapper.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from core import CancelledError, QuantConfig, VitqError, run_quantization
from service.archives import Limits
from service.db import session_scope
from service.job_inputs import data_path, spec_from_stored
from service.settings import Settings
from service.storage import StorageError, get_store
from service.tables import Artifact, Job, JobErrorCode, JobEvent, JobStatus, Report, utcnow
from worker.memory import release_memory
from worker.report_html import render_report_html

log = logging.getLogger("vitq.worker")
CONTENT_TYPES = {
    "checkpoint.safetensors": "application/octet-stream",
    "report.json": "application/json",
    "report.html": "text/html; charset=utf-8",
}


def worker_name() -> str:
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    suffix = f"/gpu{devices}" if devices else ""
    return f"{socket.gethostname()}:{os.getpid()}{suffix}"


def claim(settings: Settings, job_id: str, me: str) -> bool:
    """Compare-and-set ``queued → running`` (or take over a running job whose heartbeat stopped)."""
    now = utcnow()
    stale = now - timedelta(seconds=settings.stale_after_s)
    with session_scope(settings.resolved_database_url) as session:
        claimed = session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.cancel_requested.is_(False),
                Job.attempts < settings.max_attempts,
                or_(
                    Job.status == JobStatus.QUEUED.value,
                    (Job.status == JobStatus.RUNNING.value) & (Job.heartbeat_at < stale),
                ),
            )
            .values(
                status=JobStatus.RUNNING.value,
                attempts=Job.attempts + 1,
                worker=me,
                heartbeat_at=now,
                started_at=now,
                updated_at=now,
                progress=None,
            )
        ).rowcount
        if claimed:
            session.add(JobEvent(job_id=job_id, kind="started", message=f"claimed by {me}"))
        return bool(claimed)


def _finish(
    settings: Settings,
    job_id: str,
    me: str,
    status: JobStatus,
    *,
    code: str | None = None,
    message: str | None = None,
    extra: dict[str, Any] | None = None,
) -> bool:
    """``running → status``, only if this worker still holds the job."""
    now = utcnow()
    with session_scope(settings.resolved_database_url) as session:
        done = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.worker == me)
            .values(
                status=status.value,
                error_code=code,
                error_message=message,
                finished_at=now,
                updated_at=now,
                heartbeat_at=now,
                **(extra or {}),
            )
        ).rowcount
        if done:
            session.add(JobEvent(job_id=job_id, kind=status.value, message=message or status.value))
    return bool(done)


class JobMonitor:
    """Heartbeat thread + throttled progress writes + the cancel flag core polls through should_stop."""

    def __init__(self, settings: Settings, job_id: str, me: str) -> None:
        self.settings = settings
        self.job_id = job_id
        self.me = me
        self.cancel = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)
        self._last_write = 0.0
        self._stage: str | None = None
        self._started = time.monotonic()

    def __enter__(self) -> JobMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def should_stop(self) -> bool:
        return self.cancel.is_set() or self.lost.is_set()

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval_s):
            try:
                with session_scope(self.settings.resolved_database_url) as session:
                    alive = session.execute(
                        update(Job)
                        .where(
                            Job.id == self.job_id,
                            Job.status == JobStatus.RUNNING.value,
                            Job.worker == self.me,
                        )
                        .values(heartbeat_at=utcnow())
                    ).rowcount
                    cancel = session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id))
                if cancel:
                    self.cancel.set()
                if not alive:
                    self.lost.set()  # re-queued by a reaper, or the row is gone: stop working on it
            except Exception:
                log.exception("heartbeat for %s failed", self.job_id)

    def progress(self, event: dict[str, Any]) -> None:
        # core polls should_stop between optimization steps; progress events also come at stage
        # boundaries (load, evaluation, calibration), so a cancel takes effect there too.
        if self.should_stop():
            raise CancelledError("cancelled")
        stage = str(event.get("stage") or "")
        now = time.monotonic()
        stage_changed = stage != self._stage
        if not stage_changed and now - self._last_write < self.settings.progress_interval_s:
            return
        self._last_write = now
        done, total_steps = event.get("done") or 0, event.get("total_steps") or 0
        percent = round(100.0 * done / total_steps, 1) if total_steps else None
        elapsed = now - self._started
        eta = round(elapsed * (total_steps - done) / done, 1) if done and total_steps else None
        loss = event.get("loss")
        record = {
            "stage": stage,
            "unit": event.get("unit"),
            "index": event.get("index"),
            "total": event.get("total"),
            "loss": float(loss) if isinstance(loss, int | float) else None,
            "done": done,
            "total_steps": total_steps,
            "percent": percent,
            "eta_seconds": eta,
            "updated_at": utcnow().isoformat(),
        }
        try:
            with session_scope(self.settings.resolved_database_url) as session:
                session.execute(
                    update(Job)
                    .where(Job.id == self.job_id, Job.worker == self.me)
                    .values(progress=record, updated_at=utcnow())
                )
                if stage_changed:
                    session.add(
                        JobEvent(job_id=self.job_id, kind="stage", message=stage, data={"stage": stage})
                    )
        except DBAPIError as exc:
            # Progress is best effort: a database restart must not kill an hours-long job. The next
            # event writes again (the stage event too, since _stage is not advanced).
            log.warning("progress of %s not written (database unreachable: %s)", self.job_id, type(exc).__name__)
            return
        self._stage = stage


def _summary(report: dict[str, Any], checkpoint_sha: str, checkpoint_bytes: int) -> dict[str, Any]:
    fp = report.get("fp") or {}
    quant = report.get("quant") or {}
    return {
        "fp_top1": fp.get("top1"),
        "quant_top1": quant.get("top1"),
        "fp_top5": fp.get("top5"),
        "quant_top5": quant.get("top5"),
        "n_eval": quant.get("n"),
        "agreement": quant.get("agreement"),
        "logit_sqnr_db": quant.get("logit_sqnr_db"),
        "seconds": (report.get("seconds") or {}).get("total"),
        "checkpoint_sha256": checkpoint_sha,
        "checkpoint_bytes": checkpoint_bytes,
    }


def _store_results(session: Session, settings: Settings, job: Job, out: Path, report: dict[str, Any]) -> dict:
    store = get_store(settings.resolved_storage_dir)
    (out / "report.html").write_text(render_report_html(report, job_id=job.id), encoding="utf-8")
    shas: dict[str, tuple[str, int]] = {}
    for name, content_type in CONTENT_TYPES.items():
        sha, size = store.put_file(out / name)
        shas[name] = (sha, size)
        session.add(
            Artifact(job_id=job.id, name=name, sha256=sha, size_bytes=size, content_type=content_type)
        )
    fp = report.get("fp") or {}
    quant = report.get("quant") or {}
    session.add(
        Report(
            job_id=job.id,
            tenant_id=job.tenant_id,
            model_key=job.model_key,
            w_bits=int(report["w_bits"]),
            a_bits=int(report["a_bits"]),
            method=str(report["method"]),
            preset=str(report["preset"]),
            fp_top1=fp.get("top1"),
            fp_top5=fp.get("top5"),
            quant_top1=quant.get("top1"),
            quant_top5=quant.get("top5"),
            n_eval=quant.get("n"),
            agreement=quant.get("agreement"),
            logit_sqnr_db=quant.get("logit_sqnr_db"),
            seconds_total=(report.get("seconds") or {}).get("total"),
            report=report,
        )
    )
    sha, size = shas["checkpoint.safetensors"]
    return _summary(report, sha, size)


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)
"""OSErrors from core that mean the worker's scratch disk failed, not that the job is wrong."""


def _fail_storage(settings: Settings, job_id: str, me: str, exc: OSError) -> None:
    log.error("job %s: storage failed: %s", job_id, exc)
    reason = exc.strerror or str(exc)
    message = str(exc) if isinstance(exc, StorageError) else f"could not write job output: {reason}"
    _finish(settings, job_id, me, JobStatus.FAILED, code=JobErrorCode.STORAGE.value, message=message)


def run_job(
    settings: Settings, job_id: str, *, soft_timeout: type[BaseException] | None = None
) -> str | None:
    """Run the job if it can be claimed. Returns the final status, or None when not claimed."""
    me = worker_name()
    if not claim(settings, job_id, me):
        log.info("job %s not claimable (taken, finished, cancelled or out of attempts)", job_id)
        return None
    db_url = settings.resolved_database_url
    with session_scope(db_url) as session:
        job = session.get(Job, job_id)
        assert job is not None  # claimed a moment ago
        stored_spec, config_dict = job.model_spec, job.config
        calibration_ref, evaluation_ref = job.calibration, job.evaluation
    scratch = Path(tempfile.mkdtemp(prefix=f"vitq-{job_id}-"))
    limits = Limits(max_members=settings.max_archive_members, max_bytes=settings.max_archive_bytes)
    status = JobStatus.FAILED
    try:
        with JobMonitor(settings, job_id, me) as monitor:
            try:
                store = get_store(settings.resolved_storage_dir)
                with session_scope(db_url) as session:
                    spec = spec_from_stored(stored_spec, store, settings.resolved_cache_dir)
                    cache = settings.resolved_cache_dir / "datasets"
                    calibration = data_path(
                        session, store, ref=calibration_ref, cache_dir=cache, limits=limits
                    )
                    evaluation = (
                        data_path(session, store, ref=evaluation_ref, cache_dir=cache, limits=limits)
                        if evaluation_ref
                        else None
                    )
                report = run_quantization(
                    spec,
                    QuantConfig.from_dict(config_dict),
                    calibration=calibration,
                    evaluation=evaluation,
                    out_dir=scratch / "out",
                    progress=monitor.progress,
                    should_stop=monitor.should_stop,
                )
            except CancelledError:
                if monitor.lost.is_set() and not monitor.cancel.is_set():
                    log.warning("job %s was taken from this worker; dropping it", job_id)
                    return None
                _finish(
                    settings,
                    job_id,
                    me,
                    JobStatus.CANCELLED,
                    code="cancelled",
                    message="cancelled by request",
                )
                status = JobStatus.CANCELLED
                return status.value
            except VitqError as exc:
                _finish(settings, job_id, me, JobStatus.FAILED, code=exc.code, message=exc.message)
                return status.value
            except Exception as exc:
                if soft_timeout is not None and isinstance(exc, soft_timeout):
                    _finish(
                        settings,
                        job_id,
                        me,
                        JobStatus.FAILED,
                        code=JobErrorCode.TIMEOUT.value,
                        message=f"the job ran past the time limit of {settings.job_soft_time_limit_s} s",
                    )
                    return status.value
                if isinstance(exc, StorageError) or (isinstance(exc, OSError) and exc.errno in DISK_ERRNOS):
                    _fail_storage(settings, job_id, me, exc)
                    return status.value
                log.exception("job %s crashed", job_id)
                _finish(
                    settings,
                    job_id,
                    me,
                    JobStatus.FAILED,
                    code=JobErrorCode.INTERNAL.value,
                    message=f"{type(exc).__name__}: {str(exc)[:500]}",
                )
                return status.value
        try:
            with session_scope(db_url) as session:
                job = session.get(Job, job_id)
                if job is None or job.status != JobStatus.RUNNING.value or job.worker != me:
                    return None
                summary = _store_results(session, settings, job, scratch / "out", report)
                now = utcnow()
                job.status = JobStatus.SUCCEEDED.value
                job.result = summary
                job.finished_at = now
                job.updated_at = now
                job.progress = {**(job.progress or {}), "percent": 100.0, "eta_seconds": 0.0}
                session.add(JobEvent(job_id=job_id, kind="succeeded", message="artifacts stored"))
        except OSError as exc:  # rolled back: no artifact row points at a blob that is not whole
            _fail_storage(settings, job_id, me, exc)
            return status.value
        status = JobStatus.SUCCEEDED
        return status.value
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        release_memory()
