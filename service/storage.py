"""Content-addressed artifact storage.

``ArtifactStore`` is the small interface the API and worker use; ``LocalStore`` keeps blobs in a
directory as ``<root>/<sha[:2]>/<sha>``. An S3 backend implements the same five methods.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar

from sqlalchemy.orm import Session

from core.atomic_file import atomic_file
from core.data import sha256_file

log = logging.getLogger("vitq.storage")

CHUNK = 1024 * 1024


class StorageError(OSError):
    """The store could not take a blob (disk full, directory unwritable, …).

    A subclass of ``OSError`` that keeps the errno, so callers can tell a full disk (the client may
    retry later) from a broken store, and say which in one clear message.
    """

    @property
    def disk_full(self) -> bool:
        return self.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class ArtifactStore(Protocol):
    def put_file(self, path: Path) -> tuple[str, int]:
        """Store a copy of ``path``; return (sha256, size)."""

    def open(self, sha256: str) -> BinaryIO: ...

    def local_path(self, sha256: str) -> Path:
        """A local file holding the blob (a download into a cache for remote stores)."""

    def exists(self, sha256: str) -> bool: ...

    def delete(self, sha256: str) -> None: ...


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(exc.errno, f"artifact store {self.root} unusable: {exc.strerror or exc}") from exc

    def _path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def put_file(self, path: Path) -> tuple[str, int]:
        sha = sha256_file(path)
        size = Path(path).stat().st_size
        target = self._path(sha)
        if not target.exists():
            try:
                _write_atomically(Path(path), target)
            except OSError as exc:
                raise StorageError(exc.errno, f"could not store {Path(path).name}: {exc.strerror or exc}") from exc
        return sha, size

    def open(self, sha256: str) -> BinaryIO:
        return open(self._path(sha256), "rb")

    def local_path(self, sha256: str) -> Path:
        path = self._path(sha256)
        if not path.exists():
            raise FileNotFoundError(f"blob {sha256} is not in the store")
        return path

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).exists()

    def delete(self, sha256: str) -> None:
        self._path(sha256).unlink(missing_ok=True)


def _write_atomically(source: Path, target: Path) -> None:
    """Copy to a temporary name beside ``target``, fsync, then rename: a reader (or a crash) only
    ever sees no blob or the whole blob, never a prefix; a failed copy leaves nothing behind."""
    with atomic_file(target) as tmp, open(tmp, "wb") as out, open(source, "rb") as src:
        while chunk := src.read(CHUNK):
            out.write(chunk)


def get_store(root: Path) -> ArtifactStore:
    return LocalStore(root)


# -- store, then record: the one way an upload becomes visible -----------------------------------------

RowT = TypeVar("RowT")


def store_then_record(
    session: Session,
    store: ArtifactStore,
    path: Path,
    make_row: Callable[[str, int], RowT],
    check: Callable[[], None] | None = None,
) -> RowT:
    """Put ``path`` in the store, then add and commit the row ``make_row(sha256, size)`` that references it.

    ``check()`` runs first in the recording transaction, so locks it takes are held until the row commits
    (the storage quota under the tenant's lock); whatever it raises aborts the record like any other
    failure.

    The blob is held (``service.blob_gc.hold``: the collector cannot remove it while the row is being
    recorded) from the copy to the commit. Any failure after the blob is written (the INSERT refused, a
    value out of the column's range, the database gone, a bug) rolls the session back and releases the
    blob, which removes it unless another row names the same bytes (content addressing: another upload's
    bytes must not be lost). Call it while ``path`` still exists.
    """
    from service import blob_gc  # blob_gc imports this module

    sha, size = blob_gc.store_and_hold(session, store, path)
    try:
        if check is not None:
            check()
        row = make_row(sha, size)
        session.add(row)
        session.commit()
    except BaseException:
        session.rollback()
        try:
            blob_gc.release(session, store, [sha])
        except Exception:  # the database is unreachable: an unreferenced blob is better than a lost one
            log.warning("could not release blob %s after a failed upload; the orphan sweep will", sha,
                        exc_info=True)
        raise
    return row
