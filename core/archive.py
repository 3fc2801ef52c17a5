"""Safe extraction of ImageFolder archives (.tar, .tar.gz, .zip).

Every member is checked before anything is written: no absolute paths, no ``..``, no links,
devices or FIFOs, a bounded member count and a bounded total uncompressed size. A refused
archive leaves nothing behind in ``dest``.
"""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from core.errors import DatasetError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int = 200_000
    max_total_bytes: int = 8 * 1024**3
    max_member_bytes: int = 256 * 1024**2


def is_archive(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in ARCHIVE_SUFFIXES)


def _check_name(name: str) -> PurePosixPath:
    if "\\" in name or "\x00" in name:
        raise DatasetError(f"archive member {name!r} has an unsafe name")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or (path.parts and path.parts[0].endswith(":")):
        raise DatasetError(f"archive member {name!r} escapes the archive (absolute path or '..')")
    return path


def _tar_members(tar: tarfile.TarFile, limits: ArchiveLimits) -> list[tarfile.TarInfo]:
    members, total = [], 0
    for i, member in enumerate(tar):
        if i >= limits.max_members:
            raise DatasetError(f"archive has more than {limits.max_members} members")
        _check_name(member.name)
        if member.issym() or member.islnk():
            raise DatasetError(f"archive member {member.name!r} is a link; links are not accepted")
        if not (member.isfile() or member.isdir()):
            raise DatasetError(f"archive member {member.name!r} is a device, FIFO or other special file")
        if member.size > limits.max_member_bytes:
            raise DatasetError(f"archive member {member.name!r} is larger than {limits.max_member_bytes} bytes")
        total += member.size
        if total > limits.max_total_bytes:
            raise DatasetError(f"archive expands to more than {limits.max_total_bytes} bytes")
        members.append(member)
    return members


def _zip_members(zf: zipfile.ZipFile, limits: ArchiveLimits) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise DatasetError(f"archive has more than {limits.max_members} members")
    total = 0
    for info in infos:
        _check_name(info.filename)
        mode = (info.external_attr >> 16) & 0o170000
        if mode and mode not in (0o100000, 0o040000):
            raise DatasetError(f"archive member {info.filename!r} is a link or special file")
        if info.file_size > limits.max_member_bytes:
            raise DatasetError(f"archive member {info.filename!r} is larger than {limits.max_member_bytes} bytes")
        total += info.file_size
        if total > limits.max_total_bytes:
            raise DatasetError(f"archive expands to more than {limits.max_total_bytes} bytes")
    return infos


def safe_extract(archive: Path, dest: Path, limits: ArchiveLimits | None = None) -> Path:
    """Extract ``archive`` into ``dest`` (created) after checking every member; returns ``dest``."""
    limits = limits or ArchiveLimits()
    dest.mkdir(parents=True, exist_ok=False)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                infos = _zip_members(zf, limits)
                for info in infos:
                    target = dest / _check_name(info.filename)
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    written = 0
                    with zf.open(info) as src, open(target, "wb") as out:
                        while chunk := src.read(1 << 20):
                            written += len(chunk)
                            if written > info.file_size or written > limits.max_member_bytes:
                                raise DatasetError(f"archive member {info.filename!r} expands beyond its size")
                            out.write(chunk)
        else:
            try:
                tar = tarfile.open(archive, "r:*")
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise DatasetError(f"{archive.name} is not a readable tar or zip archive: {exc}") from None
            with tar:
                members = _tar_members(tar, limits)
                for member in members:
                    target = dest / _check_name(member.name)
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(member)
                    with src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
    except DatasetError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise DatasetError(f"{archive.name} is truncated or corrupt: {type(exc).__name__}: {exc}") from None
    return dest
