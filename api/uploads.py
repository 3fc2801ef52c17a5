"""Receiving uploaded files: bounded copies into a scratch directory that is always cleaned up."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath

from fastapi import UploadFile

from api.errors import ApiError


@contextmanager
def scratch_dir(root: Path) -> Iterator[Path]:
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=root, prefix="upload-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def safe_filename(name: str | None, default: str) -> str:
    base = PurePath((name or "").replace("\\", "/")).name
    cleaned = "".join(c for c in base if c.isalnum() or c in "._-")[:200]
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
