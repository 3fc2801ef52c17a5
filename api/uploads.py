"""Receiving uploaded files: bounded copies into a scratch directory that is always cleaned up."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath

from fastapi import UploadFile

from api.errors import ApiError


def _scratch_prefix(pid: int) -> str:
    return f"upload-{socket.gethostname()}-{pid}-"


@contextmanager
def scratch_dir(root: Path) -> Iterator[Path]:
    """A private directory for one upload, named after this host and process so that the leftovers of a
    killed process can be told apart from the uploads still in flight (``sweep_orphaned_scratch``)."""
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=root, prefix=_scratch_prefix(os.getpid())))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sweep_orphaned_scratch(root: Path) -> list[Path]:
    """Remove the upload directories of processes on this host that are gone (a killed or crashed API).

    Why: an upload cut short by a SIGKILL leaves its half-received copy behind; nothing ever reads it
    (only a committed dataset row makes a file visible), but it would fill the disk over restarts.
    """
    removed: list[Path] = []
    host_prefix = f"upload-{socket.gethostname()}-"
    if not root.is_dir():
        return removed
    for path in root.iterdir():
        if not path.name.startswith(host_prefix):
            continue
        pid_text = path.name[len(host_prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and not _alive(int(pid_text)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def safe_filename(name: str | None, default: str) -> str:
    """The client's filename as stored and echoed: its last component, letters, digits and ``._-`` only,
    no leading dots (``..``, ``.bashrc``), at most 200 characters; ``default`` when nothing is left."""
    base = PurePath((name or "").replace("\\", "/")).name
    cleaned = "".join(c for c in base if c.isalnum() or c in "._-").lstrip(".")[:200]
    return cleaned or default


def save_upload(upload: UploadFile, dest: Path, *, max_bytes: int) -> int:
    """Copy the upload to ``dest``; 413 past ``max_bytes``, 422 when empty."""
    size = 0
    upload.file.seek(0)
    with open(dest, "wb") as out:
        while chunk := upload.file.read(1024 * 1024):
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(413, "upload_too_large", f"upload exceeds the limit of {max_bytes} bytes")
            out.write(chunk)
    if size == 0:
        raise ApiError(422, "empty_upload", "the uploaded file is empty")
    return size
