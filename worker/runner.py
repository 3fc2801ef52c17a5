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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError

from core import CancelledError, QuantConfig, TargetSpec, VitqError, run_quantization, run_target_search
from service import blob_gc, lifecycle
from service.archives import Limits
from service.db import session_scope
from service.job_inputs import data_path, spec_from_stored
from service.lifecycle import Lease
from service.progress import EtaEstimator, percent
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
    "model.onnx": "application/octet-stream",
}
OPTIONAL_ARTIFACTS = {"model.onnx"}
"""Left out when the job turned the export off (``"exports": []``) or the export failed (the report and
the job's events say why); the job still succeeds with its checkpoint."""


def worker_name() -> str:
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    suffix = f"/gpu{devices}" if devices else ""
    return f"{socket.gethostname()}:{os.getpid()}{suffix}"


def claim(settings: Settings, job_id: str, me: str) -> Lease | None:
    """Win the job for this worker (``queued → running``, or take over one whose heartbeat stopped)."""
    stale_before = utcnow() - timedelta(seconds=settings.stale_after_s)
    with session_scope(settings.resolved_database_url) as session:
        return lifecycle.claim(
            session, job_id=job_id, worker=me, max_attempts=settings.max_attempts, stale_before=stale_before
        )


def _raised_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``exc`` is ``kind`` or was raised from one. Celery's soft time limit is a signal raised
    wherever the job happens to be: landing inside a SQL statement (a progress write), SQLAlchemy
    re-raises it as a ``StatementError`` from it, and the job must still end as ``timeout``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _finish(settings: Settings, transition: Callable[..., bool], lease: Lease, **kwargs: Any) -> bool:
    """Run one lifecycle transition with the worker's lease in its own transaction."""
    with session_scope(settings.resolved_database_url) as session:
        return transition(session, lease, **kwargs)


class JobMonitor:
    """Heartbeat thread + throttled progress writes + the cancel flag core polls through should_stop."""

    def __init__(self, settings: Settings, lease: Lease) -> None:
        self.settings = settings
        self.lease = lease
        self.cancel = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{lease.job_id}", daemon=True)
        self._last_write = 0.0
        self._stage: str | None = None
        self._eta = EtaEstimator()
        self.last_progress: dict[str, Any] | None = None

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
                    alive = lifecycle.heartbeat(session, self.lease)
                    cancel = lifecycle.cancel_is_requested(session, self.lease.job_id)
                if cancel:
                    self.cancel.set()
                if not alive:
                    self.lost.set()  # re-queued by a reaper, or the row is gone: stop working on it
            except Exception:
                log.exception("heartbeat for %s failed", self.lease.job_id)

    def progress(self, event: dict[str, Any]) -> None:
        # core polls should_stop between optimization steps; progress events also come at stage
        # boundaries (load, evaluation, calibration), so a cancel takes effect there too.
        if self.should_stop():
            raise CancelledError("cancelled")
        stage = str(event.get("stage") or "")
        done, total_steps = event.get("done") or 0, event.get("total_steps") or 0
        eta = self._eta.update(done, total_steps)
        now = time.monotonic()
        stage_changed = stage != self._stage
        if not stage_changed and now - self._last_write < self.settings.progress_interval_s:
            return
        self._last_write = now
        loss = event.get("loss")
        record = {
            "stage": stage,
            "unit": event.get("unit"),
            "index": event.get("index"),
            "total": event.get("total"),
            "loss": float(loss) if isinstance(loss, int | float) else None,
            "done": done,
            "total_steps": total_steps,
            "percent": percent(done, total_steps),
            "eta_seconds": eta,
            "updated_at": utcnow().isoformat(),
        }
        try:
            with session_scope(self.settings.resolved_database_url) as session:
                lifecycle.record_progress(session, self.lease, record, new_stage=stage if stage_changed else None)
        except DBAPIError as exc:
            # Progress is best effort: a database restart must not kill an hours-long job. The next
            # event writes again (the stage event too, since _stage is not advanced).
            log.warning(
                "progress of %s not written (database unreachable: %s)", self.lease.job_id, type(exc).__name__
            )
            return
        self.last_progress = record
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


def _target_summary(report: dict[str, Any]) -> dict[str, Any]:
    """A target job's answer in its result: what was chosen, whether it met the target, on which split."""
    target = report.get("target")
    if not target:
        return {}
    decision, heldout = target.get("decision") or {}, target.get("heldout") or {}
    return {
        "target_met": target.get("target_met"),
        "target_message": target.get("message"),
        "chosen": report.get("bits_label"),
        "per_unit_bits": report.get("per_unit_bits"),
        "decision_top1": decision.get("quant_top1"),
        "heldout_top1": heldout.get("quant_top1"),
        "top1_drop": decision.get("drop"),
        "heldout_drop": heldout.get("drop"),
        "model_bytes": (report.get("sizes") or {}).get("model_bytes"),
        "trials": len(target.get("trials") or []),
    }


def _result_rows(
    settings: Settings, job: JobInputs, out: Path, report: dict[str, Any], artifacts: list[Artifact]
) -> tuple[Report, dict[str, Any]]:
    """Put the job's files in the artifact store (content-addressed), appending each one's row to
    ``artifacts`` as soon as its blob is stored (so a failure later can release what was stored), and
    build the report row and the summary; :func:`service.lifecycle.succeed` adds the rows only if this
    attempt is still current."""
    store = get_store(settings.resolved_storage_dir)
    (out / "report.html").write_text(render_report_html(report, job_id=job.job_id), encoding="utf-8")
    for name, content_type in CONTENT_TYPES.items():
        if name in OPTIONAL_ARTIFACTS and not (out / name).is_file():
            continue
        sha, size = store.put_file(out / name)
        artifacts.append(
            Artifact(job_id=job.job_id, name=name, sha256=sha, size_bytes=size, content_type=content_type)
        )
    fp = report.get("fp") or {}
    quant = report.get("quant") or {}
    row = Report(
        job_id=job.job_id,
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
    checkpoint = next(a for a in artifacts if a.name == "checkpoint.safetensors")
    summary = _summary(report, checkpoint.sha256, checkpoint.size_bytes)
    summary.update(_target_summary(report))
    onnx = (report.get("exports") or {}).get("onnx") or {}
    summary.update(onnx_sha256=onnx.get("sha256"), onnx_bytes=onnx.get("bytes"), export_error=onnx.get("error"))
    return row, summary


def _release_blobs(settings: Settings, artifacts: list[Artifact]) -> None:
    """The blobs a late worker stored go again, unless a row (another job's, an upload's) names them."""
    try:
        with session_scope(settings.resolved_database_url) as session:
            blob_gc.release(session, get_store(settings.resolved_storage_dir), [a.sha256 for a in artifacts])
    except Exception:  # the retention pass's orphan sweep removes them later
        log.warning("could not release the blobs of a dropped result", exc_info=True)


FINAL_WRITE_TRIES = 3
"""Tries of the failure write after a success write failed (a database that blinked may be back)."""


def _fail_unrecorded(settings: Settings, lease: Lease, artifacts: list[Artifact], exc: Exception) -> str | None:
    """The computation finished but its success could not be written (a value the database refused, a
    constraint, a bug). Re-queueing would run it again into the same failure (a -inf SQNR ran three
    times and ended ``worker_lost``), so the job fails with ``result_not_recorded`` and the blobs no row
    names are removed. Only when even that write fails (the database is down) is the job left to the
    reaper."""
    log.error("job %s: its result could not be recorded", lease.job_id, exc_info=exc)
    _release_blobs(settings, artifacts)
    message = f"the job finished but its result could not be recorded ({type(exc).__name__}); nothing was kept"
    for attempt in range(FINAL_WRITE_TRIES):
        try:
            won = _finish(settings, lifecycle.fail, lease, code=JobErrorCode.RESULT_NOT_RECORDED.value,
                          message=message)
            return JobStatus.FAILED.value if won else None
        except Exception:
            log.warning("job %s: could not record the failure (try %d)", lease.job_id, attempt + 1, exc_info=True)
            time.sleep(1 + attempt)
    return None


def _blob_holder(settings: Settings, artifacts: list[Artifact], out: Path) -> Callable[[Any], None]:
    """Locks the artifacts' blobs in the success transaction (stored again if a deletion of another job
    that shared them removed them meanwhile), so the rows never point at a removed blob."""
    store = get_store(settings.resolved_storage_dir)
    sources = {a.sha256: out / a.name for a in artifacts}
    return lambda session: blob_gc.hold(session, store, sources)


@dataclass(frozen=True)
class JobInputs:
    """What the runner reads from the row once, right after the claim."""

    job_id: str
    tenant_id: str
    model_key: str
    model_spec: dict[str, Any]
    config: dict[str, Any]
    calibration: str
    evaluation: str | None
    exports: tuple[str, ...] = ("onnx",)
    target: dict[str, Any] | None = None
    """An accuracy target (``core.TargetSpec`` as a dict) instead of fixed bits."""
    allow_chance_fp: bool = False
    """Go on with a float model at chance level (``core.float_model``) instead of failing early."""


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)
"""OSErrors from core that mean the worker's scratch disk failed, not that the job is wrong."""


def _fail_storage(settings: Settings, lease: Lease, exc: OSError) -> str | None:
    log.error("job %s: storage failed: %s", lease.job_id, exc)
    reason = exc.strerror or str(exc)
    message = str(exc) if isinstance(exc, StorageError) else f"could not write job output: {reason}"
    won = _finish(settings, lifecycle.fail, lease, code=JobErrorCode.STORAGE.value, message=message)
    return JobStatus.FAILED.value if won else None


def run_job(
    settings: Settings, job_id: str, *, soft_timeout: type[BaseException] | None = None
) -> str | None:
    """Run the job if it can be claimed. Returns the final status, or None when not claimed (or when
    the job was taken from this worker before it finished)."""
    lease = claim(settings, job_id, worker_name())
    if lease is None:
        log.info("job %s not claimable (taken, finished, cancelled or out of attempts)", job_id)
        return None
    db_url = settings.resolved_database_url
    with session_scope(db_url) as session:
        row = session.get(Job, job_id)
        assert row is not None  # claimed a moment ago
        job = JobInputs(row.id, row.tenant_id, row.model_key, row.model_spec, row.config, row.calibration,
                        row.evaluation, tuple((row.request or {}).get("exports", ("onnx",))),
                        (row.request or {}).get("target"), bool((row.request or {}).get("allow_chance_fp")))
    scratch = Path(tempfile.mkdtemp(prefix=f"vitq-{job_id}-"))
    limits = Limits(max_members=settings.max_archive_members, max_bytes=settings.max_archive_bytes)
    try:
        with JobMonitor(settings, lease) as monitor:
            try:
                store = get_store(settings.resolved_storage_dir)
                with session_scope(db_url) as session:
                    hub = settings.hub_policy()  # hub ids: config and weights fetched here (fetch_weights stage)
                    spec = spec_from_stored(job.model_spec, store, settings.resolved_cache_dir, hub=hub)
                    cache = settings.resolved_cache_dir / "datasets"
                    calibration = data_path(session, store, ref=job.calibration, cache_dir=cache, limits=limits)
                    evaluation = (
                        data_path(session, store, ref=job.evaluation, cache_dir=cache, limits=limits)
                        if job.evaluation
                        else None
                    )
                common = dict(calibration=calibration, evaluation=evaluation, out_dir=scratch / "out",
                              progress=monitor.progress, should_stop=monitor.should_stop, exports=job.exports,
                              hub_policy=hub, allow_chance_fp=job.allow_chance_fp)
                if job.target is not None:
                    report = run_target_search(spec, TargetSpec.from_dict(job.target),
                                               QuantConfig.from_dict(job.config), **common)
                else:
                    report = run_quantization(spec, QuantConfig.from_dict(job.config), **common)
            except CancelledError:
                if monitor.lost.is_set() and not monitor.cancel.is_set():
                    log.warning("job %s was taken from this worker; dropping it", job_id)
                    return None
                won = _finish(settings, lifecycle.cancelled, lease)
                return JobStatus.CANCELLED.value if won else None
            except VitqError as exc:
                won = _finish(settings, lifecycle.fail, lease, code=exc.code, message=exc.message)
                return JobStatus.FAILED.value if won else None
            except Exception as exc:
                if soft_timeout is not None and _raised_by(exc, soft_timeout):
                    won = _finish(settings, lifecycle.timeout, lease, limit_s=settings.job_soft_time_limit_s)
                    return JobStatus.FAILED.value if won else None
                if isinstance(exc, StorageError) or (isinstance(exc, OSError) and exc.errno in DISK_ERRNOS):
                    return _fail_storage(settings, lease, exc)
                log.exception("job %s crashed", job_id)
                won = _finish(
                    settings,
                    lifecycle.fail,
                    lease,
                    code=JobErrorCode.INTERNAL.value,
                    message=f"{type(exc).__name__}: {str(exc)[:500]}",
                )
                return JobStatus.FAILED.value if won else None
        artifacts: list[Artifact] = []  # filled as the blobs are stored, so a failure can release them
        try:
            report_row, summary = _result_rows(settings, job, scratch / "out", report, artifacts)
            won = _finish(
                settings,
                lifecycle.succeed,
                lease,
                summary=summary,
                progress=monitor.last_progress,
                artifacts=artifacts,
                report=report_row,
                hold_blobs=_blob_holder(settings, artifacts, scratch / "out"),
            )
        except OSError as exc:  # rolled back: no artifact row points at a blob that is not whole
            _release_blobs(settings, artifacts)
            return _fail_storage(settings, lease, exc)
        except Exception as exc:  # the success write failed: never re-queue a finished computation
            return _fail_unrecorded(settings, lease, artifacts, exc)
        if not won:
            log.warning("job %s was re-queued, taken over or ended while it finished; its results are dropped", job_id)
            _release_blobs(settings, artifacts)
            return None
        if summary.get("export_error"):
            log.warning("job %s: model.onnx not written: %s", job_id, summary["export_error"])
            with session_scope(db_url) as session:
                session.add(JobEvent(job_id=job_id, kind="export_failed",
                                     message=f"model.onnx was not written: {summary['export_error']}"))
        return JobStatus.SUCCEEDED.value
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        release_memory()
