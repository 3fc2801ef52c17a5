"""The retention pass (``VITQ_RETENTION_DAYS``): finished jobs' artifacts past that age are removed and
the job row stays, with ``artifacts_expired: true``; blobs no row names any more go with them. Each
pass also removes orphaned blobs (no row names them, older than ``VITQ_ORPHAN_BLOB_GRACE_S``) and this
host's cached copies of blobs that are gone. Every worker runs it every ``VITQ_RETENTION_INTERVAL_S``;
two workers' passes expire each job once (a compare-and-set in ``service.blob_gc``).
"""

from __future__ import annotations

import logging
import shutil
from datetime import timedelta
from pathlib import Path

from service import blob_gc
from service.db import session_scope
from service.settings import Settings
from service.storage import get_store
from service.tables import utcnow
from worker.periodic import PeriodicPass

log = logging.getLogger("vitq.worker")


def retention_pass(settings: Settings) -> dict[str, list[str]]:
    """One pass; returns the jobs whose artifacts expired and the blobs removed."""
    store = get_store(settings.resolved_storage_dir)
    expired: list[str] = []
    removed: list[str] = []
    with session_scope(settings.resolved_database_url) as session:
        if settings.retention_days is not None:
            cutoff = utcnow() - timedelta(days=settings.retention_days)
            for job_id in blob_gc.expired_jobs(session, older_than=cutoff):
                gone = blob_gc.expire_job_artifacts(session, store, job_id)
                if gone is not None:
                    expired.append(job_id)
                    removed.extend(gone)
        removed.extend(
            blob_gc.sweep_orphans(
                session, settings.resolved_storage_dir, store, grace_s=settings.orphan_blob_grace_s
            )
        )
    prune_cache(settings.resolved_cache_dir, store)
    if expired or removed:
        log.info("retention: artifacts expired for %d job(s), %d blob(s) removed", len(expired), len(removed))
    return {"expired": expired, "removed": removed}


def prune_cache(cache_dir: Path, store: object) -> list[Path]:
    """Remove this host's copies (extracted datasets, model files) of blobs no longer in the store."""
    pruned = []
    candidates = list((cache_dir / "datasets").glob("*")) + list((cache_dir / "models").glob("*.safetensors"))
    for path in candidates:
        sha = path.name.split(".", 1)[0]
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            continue
        if not store.exists(sha):  # type: ignore[attr-defined]
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            pruned.append(path)
    return pruned


def retention(settings: Settings) -> PeriodicPass:
    """:func:`retention_pass` shortly after worker start (30 s) and then every ``retention_interval_s``."""
    return PeriodicPass("retention", lambda: retention_pass(settings), settings.retention_interval_s,
                        first_delay_s=min(30.0, settings.retention_interval_s))
