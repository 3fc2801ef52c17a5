"""The store invariant the upload tests hold the service to: every blob is named by a row."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from service.db import session_scope
from service.settings import Settings
from service.tables import Artifact, Dataset, Model


def store_blobs(store_root: Path) -> set[str]:
    """sha256 names of the finished blobs under a local store (temporaries of a write are skipped)."""
    return {
        p.name
        for p in Path(store_root).glob("??/*")
        if p.is_file() and len(p.name) == 64 and all(c in "0123456789abcdef" for c in p.name)
    }


def referenced_blobs(database_url: str) -> set[str]:
    """sha256 of every dataset, model and artifact row (any tenant)."""
    with session_scope(database_url) as session:
        return {sha for table in (Dataset, Model, Artifact) for sha in session.scalars(select(table.sha256))}


def orphan_blobs(settings: Settings) -> set[str]:
    """Blobs in the service's store that no row names: the bytes of an upload that failed after it was
    stored (issue 15's first finding), or of rows deleted without their blobs."""
    return store_blobs(settings.resolved_storage_dir) - referenced_blobs(settings.resolved_database_url)
