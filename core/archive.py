"""Safe extraction of ImageFolder archives (.tar, .tar.gz, .zip).

Every member is checked before anything is written: no absolute paths, no ``..``, no links,
devices or FIFOs, a bounded member count and a bounded total uncompressed size. A refused
archive leaves nothing behind in ``dest``.
"""

from __future__ import annotations

import shutil
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from core.errors import DatasetError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int = 200_000
    max_total_bytes: int = 8 * 1024**3
    max_member_bytes: int = 256 * 1024**2
    max_compression_ratio: float = 200.0
    """Uncompressed/compressed, for members (zip) or whole streams (tar.gz) over 1 MiB: images and
    arrays compress a few times at most, a zip bomb by a thousand."""


RATIO_MIN_BYTES = 1024 * 1024


def is_archive(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in ARCHIVE_SUFFIXES)


def _check_name(name: str) -> PurePosixPath:
    if "\\" in name or "\x00" in name or not name:
        raise DatasetError(f"archive member {name!r} has an unsafe name")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or (path.parts and path.parts[0].endswith(":")):
        raise DatasetError(f"archive member {name!r} escapes the archive (absolute path or '..')")
    return path


def _check_sizes(name: str, size: int, total: int, limits: ArchiveLimits) -> None:
    if total > limits.max_total_bytes:
        raise DatasetError(f"archive expands to more than {limits.max_total_bytes} bytes")
    if size > limits.max_member_bytes:
        raise DatasetError(f"archive member {name!r} is larger than {limits.max_member_bytes} bytes")


def _check_ratio(what: str, expanded: int, compressed: int, limits: ArchiveLimits) -> None:
    if expanded > RATIO_MIN_BYTES and expanded > limits.max_compression_ratio * max(compressed, 1):
        raise DatasetError(
            f"{what} expands {expanded / max(compressed, 1):.0f}× (compression ratio limit "
            f"{limits.max_compression_ratio:g}×): refused as a likely zip bomb"
        )


def check_tar_members(tar: tarfile.TarFile, limits: ArchiveLimits, compressed_bytes: int) -> list[tarfile.TarInfo]:
    """Every member's name, type and size, before anything is written; stops at the member limit."""
    members, total = [], 0
    for i, member in enumerate(tar):
        if i >= limits.max_members:
            raise DatasetError(f"archive has more than {limits.max_members} members")
        _check_name(member.name)
        if member.issym() or member.islnk():
            raise DatasetError(f"archive member {member.name!r} is a link; links are not accepted")
        if not (member.isfile() or member.isdir()):
            raise DatasetError(f"archive member {member.name!r} is a device, FIFO or other special file")
        total += member.size
        _check_sizes(member.name, member.size, total, limits)
        members.append(member)
    _check_ratio("the archive", total, compressed_bytes, limits)
    return members


def check_zip_members(
    zf: zipfile.ZipFile, limits: ArchiveLimits, *, only_suffix: str | None = None
) -> list[zipfile.ZipInfo]:
    """Every member's name, type, encryption, size and compression ratio, from the central directory."""
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise DatasetError(f"archive has more than {limits.max_members} members")
    total = 0
    for info in infos:
        _check_name(info.filename)
        mode = (info.external_attr >> 16) & 0o170000
        if mode and mode not in (0o100000, 0o040000):
            raise DatasetError(f"archive member {info.filename!r} is a link or special file")
        if info.flag_bits & 0x1:
            raise DatasetError(f"archive member {info.filename!r} is encrypted")
        if only_suffix and not info.is_dir() and not info.filename.endswith(only_suffix):
            raise DatasetError(f"archive member {info.filename!r} is not a {only_suffix} file")
        total += info.file_size
        _check_sizes(info.filename, info.file_size, total, limits)
        _check_ratio(f"archive member {info.filename!r}", info.file_size, info.compress_size, limits)
    return infos


def _write_member(src: BinaryIO, target: Path, name: str, size: int, limits: ArchiveLimits) -> None:
    """Copy one member in chunks; never more bytes than it declared (a lying header is refused)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with src, open(target, "wb") as out:
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > size or written > limits.max_member_bytes:
                raise DatasetError(f"archive member {name!r} expands beyond its size")
            out.write(chunk)


def safe_extract(archive: Path, dest: Path, limits: ArchiveLimits | None = None) -> Path:
    """Extract ``archive`` into ``dest`` (created) after checking every member; returns ``dest``."""
    limits = limits or ArchiveLimits()
    dest.mkdir(parents=True, exist_ok=False)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in check_zip_members(zf, limits):
                    target = dest / _check_name(info.filename)
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                    else:
                        _write_member(zf.open(info), target, info.filename, info.file_size, limits)
        else:
            try:
                tar = tarfile.open(archive, "r:*")
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise DatasetError(f"{archive.name} is not a readable tar or zip archive: {exc}") from None
            with tar:
                for member in check_tar_members(tar, limits, archive.stat().st_size):
                    target = dest / _check_name(member.name)
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    src = tar.extractfile(member)
                    if src is None:
                        raise DatasetError(f"archive member {member.name!r} has no data")
                    _write_member(src, target, member.name, member.size, limits)
    except DatasetError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise DatasetError(f"{archive.name} is truncated or corrupt: {type(exc).__name__}: {exc}") from None
    return dest
