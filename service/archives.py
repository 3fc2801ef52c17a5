"""Checks and safe extraction for uploaded dataset archives (ImageFolder in .zip/.tar/.tar.gz, or .npz).

No web imports: the worker uses ``materialize_dataset`` to turn a stored blob back into a local path.
Rules: no absolute paths, no ``..``, no links or devices, bounded member count and uncompressed size.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core.archive import ArchiveLimits, check_tar_members, check_zip_members, safe_extract
from core.data import IMAGE_SUFFIXES, check_labels, exception_reason, inspect_dataset
from core.errors import DatasetError
from core.pixel_budget import PixelBudget, PixelCounter
from service.settings import Settings
from service.storage import ArtifactStore

FORMATS = ("npz", "zip", "tar")


class ArchiveError(ValueError):
    """The upload is not an acceptable dataset archive; the message says why."""


@dataclass(frozen=True)
class Limits:
    max_members: int
    max_bytes: int
    pixels: PixelBudget = PixelBudget()
    """Pixels per image and per archive, checked from each header before the image is decoded."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        pixels = PixelBudget()
        if settings.max_image_pixels is not None:
            pixels = replace(pixels, per_image=settings.max_image_pixels)
        if settings.max_dataset_pixels is not None:
            pixels = replace(pixels, total=settings.max_dataset_pixels)
        return cls(max_members=settings.max_archive_members, max_bytes=settings.max_archive_bytes, pixels=pixels)


def detect_format(filename: str, path: Path) -> str:
    name = filename.lower()
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile as exc:
            raise ArchiveError(f"corrupt zip file: {exc}") from None
        return "npz" if names and all(n.endswith(".npy") for n in names) else "zip"
    if head[:2] == b"\x1f\x8b" or (len(head) >= 262 and head[257:262] == b"ustar"):
        return "tar"
    raise ArchiveError(
        "unsupported dataset file: upload an .npz (x, optional y) "
        "or an ImageFolder archive (.zip, .tar, .tar.gz)"
    )


def _core_limits(limits: Limits) -> ArchiveLimits:
    return ArchiveLimits(
        max_members=limits.max_members, max_total_bytes=limits.max_bytes, max_member_bytes=limits.max_bytes
    )


def check_zip(path: Path, limits: Limits, *, npz: bool = False) -> None:
    """core's member checks (names, links, encryption, sizes, compression ratio; ``.npy`` only for an
    .npz), then every member's CRC, so a corrupt upload is refused before anything is stored."""
    try:
        with zipfile.ZipFile(path) as zf:
            check_zip_members(zf, _core_limits(limits), only_suffix=".npy" if npz else None)
            bad = zf.testzip()
            if bad is not None:
                raise ArchiveError(f"archive member is corrupt: {bad!r}")
    except DatasetError as exc:
        raise ArchiveError(str(exc)) from None
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
        raise ArchiveError(f"corrupt or truncated zip archive: {exception_reason(exc)}") from None


def check_tar(path: Path, limits: Limits) -> None:
    """core's member checks, then read every member through, so truncation shows before extraction."""
    try:
        with tarfile.open(path, "r:*") as tf:
            for member in check_tar_members(tf, _core_limits(limits), path.stat().st_size):
                stream = tf.extractfile(member) if member.isfile() else None
                while stream is not None and stream.read(1024 * 1024):
                    pass
    except DatasetError as exc:
        raise ArchiveError(str(exc)) from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ArchiveError(f"corrupt or truncated tar archive: {exception_reason(exc)}") from None


def extract(path: Path, fmt: str, dest: Path, limits: Limits) -> Path:
    """Check then extract an ImageFolder archive into ``dest``; return the ImageFolder root."""
    if fmt not in ("zip", "tar"):
        raise ArchiveError(f"not an archive format: {fmt}")
    if fmt == "zip":
        check_zip(path, limits)
    else:
        check_tar(path, limits)
    try:
        safe_extract(path, dest, _core_limits(limits))
    except DatasetError as exc:
        raise ArchiveError(str(exc)) from None
    return imagefolder_root(dest)


def imagefolder_root(root: Path) -> Path:
    """Descend through a single wrapping directory (``data/<class>/<image>`` → ``data``)."""
    while True:
        entries = [p for p in root.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX"]
        dirs = [p for p in entries if p.is_dir()]
        only_dirs = dirs and all(c.is_dir() for c in dirs[0].iterdir() if not c.name.startswith("."))
        if len(entries) == 1 and only_dirs:
            children = [c for c in dirs[0].iterdir() if not c.name.startswith(".")]
            if children:
                root = dirs[0]
                continue
        return root


def check_images(root: Path, max_images: int, pixels: PixelBudget | None = None) -> int:
    """Every file under a class directory decodes as an image, within the pixel budget (each image's size
    read from its header before it is decoded); labels come from class directories."""
    counter = PixelCounter(pixels or PixelBudget())
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ArchiveError("an ImageFolder archive needs one directory per class, holding images")
    stray = [p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    if stray:
        raise ArchiveError(f"files outside class directories: {', '.join(sorted(stray)[:5])}")
    count = 0
    for class_dir in classes:
        for file in sorted(class_dir.rglob("*")):
            if file.is_dir() or file.name.startswith("."):
                continue
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                raise ArchiveError(f"not an image file: {file.relative_to(root)}")
            try:
                with Image.open(file) as image:
                    counter.admit(image, str(file.relative_to(root)))
                    image.load()
            except DatasetError as exc:
                raise ArchiveError(exc.message) from None
            except Exception as exc:  # PIL raises many types for broken files
                raise ArchiveError(
                    f"image does not decode: {file.relative_to(root)}: {exception_reason(exc)}"
                ) from None
            count += 1
            if count > max_images:
                raise ArchiveError(f"more than {max_images} images")
    if count == 0:
        raise ArchiveError("the archive holds no images")
    return count


def check_npz(path: Path, limits: Limits) -> None:
    check_zip(path, limits, npz=True)
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data.files:
                raise ArchiveError(f".npz needs an array 'x' (images); it has {sorted(data.files)}")
            x = data["x"]
            if x.ndim not in (3, 4) or x.shape[0] == 0:
                raise ArchiveError(f"'x' must be N×H×W, N×H×W×C or N×C×H×W (N > 0), got {list(x.shape)}")
            if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
                raise ArchiveError(f"'x' must be uint8 or float, got {x.dtype}")
            if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
                raise ArchiveError("'x' holds NaN or infinite values")
            if "y" in data.files:
                y = data["y"]
                if y.ndim != 1 or len(y) != len(x):
                    raise ArchiveError(f"'y' must be 1-D, one label per image, got {list(y.shape)}")
                if not np.issubdtype(y.dtype, np.integer):
                    raise ArchiveError(f"'y' must hold integer class labels, got {y.dtype}")
                try:
                    check_labels(y, len(x), "'y'")  # range: class indices, before anything is stored
                except DatasetError as exc:
                    raise ArchiveError(exc.message) from None
    except ArchiveError:
        raise
    except ValueError as exc:  # includes "Object arrays cannot be loaded when allow_pickle=False"
        raise ArchiveError(f"unreadable .npz: {exception_reason(exc)}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ArchiveError(f"corrupt or truncated .npz: {exception_reason(exc)}") from None


def validate_upload(raw: Path, filename: str, workdir: Path, limits: Limits) -> tuple[str, Path, dict[str, Any]]:
    """An uploaded dataset, checked before it is accepted: ``(format, checked path, core's description)``.
    Raises ``ArchiveError`` or ``DatasetError`` with a message for the client."""
    fmt = detect_format(filename, raw)
    if fmt == "npz":
        path = workdir / "data.npz"
        raw.rename(path)
        check_npz(path, limits)
    else:
        path = extract(raw, fmt, workdir / "extracted", limits)
        check_images(path, limits.max_members, limits.pixels)
    return fmt, path, inspect_dataset(str(path), name=filename)


def materialize_dataset(
    store: ArtifactStore, cache_dir: Path, *, sha256: str, fmt: str, limits: Limits
) -> Path:
    """A local path core can read for a stored dataset blob (an .npz file or an ImageFolder dir)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    blob = store.local_path(sha256)
    if fmt == "npz":
        target = cache_dir / f"{sha256}.npz"
        if not target.exists():
            fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npz")
            os.close(fd)
            shutil.copyfile(blob, tmp)
            os.replace(tmp, target)
        return target
    target = cache_dir / sha256
    if not target.exists():
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".extract-"))
        try:
            extract(blob, fmt, tmp / "data", limits)
            os.replace(tmp / "data", target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return imagefolder_root(target)
