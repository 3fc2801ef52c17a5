"""Reference-counted removal of blobs from the content-addressed store.

A blob (``<store>/<sha[:2]>/<sha>``) is shared by every row that names its sha256: datasets, models and
job artifacts, of any tenant (two tenants uploading the same bytes share one blob). It is removed only
when no such row is left, and never while a row that needs it is being recorded. Both sides take the
same lock, the ``blobs`` row of that sha256 (an upsert: a row lock on PostgreSQL, the write lock on
SQLite), in this order:

- a writer, in the transaction that inserts its rows: :func:`hold` locks, stores the bytes again if the
  collector removed them a moment ago, and the commit of the rows releases the lock;
- the collector, after the rows are deleted and committed: :func:`release` locks, counts the rows that
  still name the sha256 and unlinks the file only when there are none, while holding the lock.

So a writer that found the blob already present (and skipped the copy) either holds the lock first
(the collector then counts its row) or comes second and finds the file gone and puts it back. Locks are
taken in sha256 order, after any job row lock, so two of these never wait on each other in a cycle.

:func:`sweep_orphans` removes blobs no row names that are older than a grace period: the bytes of an
upload whose transaction failed, or of a job deleted while its worker was storing its results.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from service.storage import ArtifactStore
from service.tables import FINISHED_STATUSES, Artifact, Blob, Dataset, Job, Model, utcnow

log = logging.getLogger("vitq.blobs")


def _lock(session: Session, sha256: str) -> None:
    values = {"sha256": sha256, "held_at": utcnow()}
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    statement = insert(Blob).values(**values)
    session.execute(statement.on_conflict_do_update(index_elements=["sha256"], set_={"held_at": values["held_at"]}))


def references(session: Session, sha256: str) -> int:
    """How many rows (datasets, models, artifacts; every tenant) name this blob."""
    return sum(
        session.scalar(select(func.count()).select_from(table).where(table.sha256 == sha256)) or 0
        for table in (Dataset, Model, Artifact)
    )


def hold(session: Session, store: ArtifactStore, sources: Mapping[str, Path]) -> None:
    """Lock each blob for the caller's open transaction and make sure its bytes are in the store
    (copied again from ``sources[sha]`` if the collector removed them since the caller stored them).
    Call it after ``store.put_file`` and before inserting the rows; their commit releases the locks."""
    for sha in sorted(sources):
        _lock(session, sha)
        if not store.exists(sha):
            log.info("blob %s was collected while it was being recorded; storing it again", sha)
            store.put_file(sources[sha])


def store_and_hold(session: Session, store: ArtifactStore, path: Path) -> tuple[str, int]:
    """``store.put_file(path)`` and :func:`hold` on it: the blob stays until the caller's rows are in."""
    sha, size = store.put_file(path)
    hold(session, store, {sha: path})
    return sha, size


def release(database_session: Session, store: ArtifactStore, shas: Iterable[str]) -> list[str]:
    """Remove the blobs of ``shas`` that no row names any more (call it after the delete committed).
    Each blob is checked and unlinked under its lock in a transaction of its own. Returns the removed."""
    removed = []
    for sha in sorted(set(shas)):
        try:
            _lock(database_session, sha)
            if references(database_session, sha) == 0:
                store.delete(sha)  # under the lock: a writer waiting for it will find the file gone
                database_session.execute(delete(Blob).where(Blob.sha256 == sha))
                removed.append(sha)
            database_session.commit()
        except BaseException:
            database_session.rollback()
            raise
    return removed


# -- deletion of rows, then of their blobs -----------------------------------------------------------


def job_blobs(session: Session, job_id: str) -> list[str]:
    return list(session.scalars(select(Artifact.sha256).where(Artifact.job_id == job_id)))


def delete_job(session: Session, job_id: str) -> list[str]:
    """Delete the job row (its events, report and artifact rows go with it, ON DELETE CASCADE) in the
    caller's transaction; returns the blobs to :func:`release` once it is committed. The row is locked
    first, so artifacts a worker records at the same moment are either seen here or never recorded."""
    session.execute(
        update(Job).where(Job.id == job_id).values(updated_at=utcnow()).execution_options(synchronize_session=False)
    )
    shas = job_blobs(session, job_id)
    session.execute(delete(Artifact).where(Artifact.job_id == job_id))
    session.execute(delete(Job).where(Job.id == job_id).execution_options(synchronize_session=False))
    return shas


def delete_upload_and_release(session: Session, store: ArtifactStore, row: Dataset | Model) -> None:
    """Delete a dataset or model row, commit, then remove its blob if no other row names it: the
    order both DELETE routes need (the blob never goes before the row that names it)."""
    sha = row.sha256
    session.delete(row)
    session.commit()
    release(session, store, [sha])


def active_jobs_using(session: Session, *, tenant_id: str, dataset_id: str | None = None,
                      model_id: str | None = None) -> int:
    """Queued or running jobs of the tenant that read this dataset or uploaded model."""
    query = select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant_id, Job.status.not_in(FINISHED_STATUSES)
    )
    if dataset_id is not None:
        query = query.where((Job.calibration == dataset_id) | (Job.evaluation == dataset_id))
    if model_id is not None:
        query = query.where(Job.model_key == model_id)
    return int(session.scalar(query) or 0)


def expire_job_artifacts(session: Session, store: ArtifactStore, job_id: str) -> list[str] | None:
    """Retention: drop a finished job's artifact rows and mark it ``artifacts_expired`` (a compare-and-set,
    so two workers' passes expire a job once), commit, then remove the blobs nobody else names.
    ``None`` when another pass (or a delete) got there first."""
    won = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.artifacts_expired.is_(False), Job.status.in_(FINISHED_STATUSES))
        .values(artifacts_expired=True, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount
    if not won:
        session.rollback()
        return None
    shas = job_blobs(session, job_id)
    session.execute(delete(Artifact).where(Artifact.job_id == job_id))
    session.commit()
    return release(session, store, shas)


def expired_jobs(session: Session, *, older_than: datetime, limit: int = 500) -> list[str]:
    return list(
        session.scalars(
            select(Job.id)
            .where(
                Job.status.in_(FINISHED_STATUSES),
                Job.artifacts_expired.is_(False),
                Job.finished_at < older_than,
            )
            .order_by(Job.finished_at)
            .limit(limit)
        )
    )


def sweep_orphans(session: Session, store_root: Path, store: ArtifactStore, *, grace_s: float) -> list[str]:
    """Remove blobs in a local store that no row names and that were written more than ``grace_s`` ago
    (younger ones may belong to a writer that has not recorded its row yet)."""
    cutoff = time.time() - grace_s
    held_after = utcnow() - timedelta(seconds=grace_s)
    candidates = []
    for path in Path(store_root).glob("??/*"):
        name = path.name
        if len(name) != 64 or any(c not in "0123456789abcdef" for c in name):
            continue  # a temporary of a write in progress, or not ours
        try:
            if path.stat().st_mtime >= cutoff:
                continue
        except FileNotFoundError:
            continue
        candidates.append(name)
    recent = set(
        session.scalars(select(Blob.sha256).where(Blob.sha256.in_(candidates), Blob.held_at >= held_after))
    ) if candidates else set()
    session.rollback()
    return release(session, store, [sha for sha in candidates if sha not in recent])
