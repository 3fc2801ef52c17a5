"""Datasets: ImageFolder directories and archives, ``.npz`` arrays, and built-in Fashion-MNIST.

Everything becomes an ``ImageDataset`` that yields preprocessed float images for one model's
``Preprocess``. Raw uint8 arrays are kept in memory and preprocessed per batch; ImageFolder
files are decoded lazily, so a large evaluation set never sits in memory as floats.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from core.archive import is_archive, safe_extract
from core.errors import DatasetError
from core.file_hash import sha256_file
from core.models import Preprocess
from core.pixel_budget import PixelBudget, PixelCounter, check_image_size

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
MAX_CLASSES = 100_000
"""Labels are class indices below this (ImageNet-21k has 21,841 classes)."""
FASHION_MNIST_SPEC = re.compile(r"^fashion-mnist:(train|test)(?::([0-9]{1,6}))?$")
"""``fashion-mnist:train``, ``fashion-mnist:test``, optionally ``:N`` (the first N images)."""
_FMNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[^\s/'\"]+/)+([^\s/'\"]*)")


def exception_reason(exc: BaseException) -> str:
    """An exception's message for the user, with any absolute path cut to its last component (PIL and
    OSError messages name the file by its full path, which here is a server's scratch directory)."""
    return _ABSOLUTE_PATH.sub(r"\1", str(exc))[:300] or type(exc).__name__



def preprocess_uint8(images: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 N×C×H×W → normalised float N×C'×H'×W' for the model (channels, resize, crop, norm)."""
    x = images.float() / 255.0
    channels, height, width = pre.input_size
    if x.shape[1] != channels:
        if channels == 1:
            x = x.mean(dim=1, keepdim=True)
        elif x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        else:
            raise DatasetError(f"images have {x.shape[1]} channels; the model expects {channels}")
    if x.shape[-2:] != (height, width):
        scale_h, scale_w = math.floor(height / pre.crop_pct), math.floor(width / pre.crop_pct)
        mode = pre.interpolation if pre.interpolation != "nearest" else "nearest-exact"
        antialias = mode in ("bilinear", "bicubic")
        x = F.interpolate(x, size=(scale_h, scale_w), mode=mode, antialias=antialias, align_corners=False
                          if antialias else None)
        top, left = (scale_h - height) // 2, (scale_w - width) // 2
        x = x[..., top : top + height, left : left + width].clamp(0, 1)
    mean = torch.tensor(pre.mean).view(1, -1, 1, 1)
    std = torch.tensor(pre.std).view(1, -1, 1, 1)
    return (x - mean) / std


class ImageDataset(torch.utils.data.Dataset):
    """Preprocessed images (and labels, where known) for one model.

    Backed either by a uint8/float array in memory or by a list of image files.
    """

    def __init__(
        self,
        preprocess: Preprocess,
        *,
        source: str,
        fingerprint: str,
        array: np.ndarray | None = None,
        normalized: bool = False,
        files: list[Path] | None = None,
        labels: np.ndarray | None = None,
        classes: list[str] | None = None,
        tempdir: Path | None = None,
    ) -> None:
        self.preprocess, self.source, self.fingerprint = preprocess, source, fingerprint
        self.array, self.normalized, self.files = array, normalized, files
        self.labels = labels
        self.classes = classes
        self._tempdir = tempdir
        self._max_image_pixels = PixelBudget().for_input_size(preprocess.input_size).per_image
        n = len(files) if files is not None else len(array)
        if labels is not None and len(labels) != n:
            raise DatasetError(f"{source}: {len(labels)} labels for {n} images")
        if normalized and tuple(array.shape[1:]) != tuple(preprocess.input_size):
            raise DatasetError(
                f"{source}: float images are {list(array.shape[1:])} but the model expects "
                f"{list(preprocess.input_size)} (C×H×W, already normalised)"
            )

    def __del__(self) -> None:
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    @property
    def num_classes(self) -> int | None:
        if self.labels is None:
            return None
        return len(self.classes) if self.classes else int(self.labels.max()) + 1 if len(self.labels) else 0

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else len(self.array)

    def _load_files(self, indices: range | list[int]) -> torch.Tensor:
        out = []
        for i in indices:
            path = self.files[i]
            mode = "L" if self.preprocess.input_size[0] == 1 else "RGB"
            try:
                with Image.open(path) as img:
                    check_image_size(img, path.name, self._max_image_pixels)
                    arr = np.asarray(img.convert(mode), dtype=np.uint8)
            except DatasetError as exc:
                raise DatasetError(f"{self.source}: {exc.message}") from None
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                raise DatasetError(f"{self.source}: cannot decode image {path.name}: {exception_reason(exc)}") from None
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            out.append(preprocess_uint8(torch.from_numpy(arr.copy())[None], self.preprocess))
        return torch.cat(out)

    def slice(self, start: int, stop: int) -> torch.Tensor:
        """Preprocessed images ``[start, stop)`` as one float tensor."""
        stop = min(stop, len(self))
        if self.files is not None:
            return self._load_files(range(start, stop))
        return self._preprocess_array(np.array(self.array[start:stop]))

    def take(self, indices: np.ndarray) -> torch.Tensor:
        """Preprocessed images at ``indices``, in that order; only those files are decoded."""
        if self.files is not None:
            return self._load_files([int(i) for i in indices])
        return self._preprocess_array(np.asarray(self.array[np.asarray(indices, dtype=np.int64)]))

    def _preprocess_array(self, array: np.ndarray) -> torch.Tensor:
        chunk = torch.from_numpy(array)
        if self.normalized:
            return chunk.float()
        if chunk.dim() == 3:
            chunk = chunk[:, None]
        elif chunk.shape[-1] in (1, 3, 4) and chunk.shape[1] not in (1, 3, 4):
            chunk = chunk.permute(0, 3, 1, 2)
        if chunk.shape[1] == 4:
            chunk = chunk[:, :3]
        return preprocess_uint8(chunk, self.preprocess)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = int(self.labels[index]) if self.labels is not None else -1
        return self.slice(index, index + 1)[0], label

    def images(self, n: int | None = None) -> torch.Tensor:
        return self.slice(0, len(self) if n is None else min(n, len(self)))

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        for start in range(0, len(self), batch_size):
            x = self.slice(start, start + batch_size)
            y = None
            if self.labels is not None:
                y = torch.from_numpy(np.asarray(self.labels[start : start + batch_size], dtype=np.int64))
            yield x, y


def _read_idx(path: Path, limit: int | None = None) -> np.ndarray:
    """An IDX array, decompressing only the first ``limit`` records: a calibration set of 8 images
    should not pay for inflating all 60,000 (0.2 s a job)."""
    try:
        with gzip.open(path, "rb") as f:
            head = f.read(4)
            ndim = head[3]
            dims = [int.from_bytes(f.read(4), "big") for _ in range(ndim)]
            if limit is not None:
                dims[0] = min(dims[0], limit)
            record = math.prod(dims[1:])
            data = f.read(dims[0] * record)
    except (OSError, EOFError, IndexError) as exc:  # BadGzipFile is an OSError
        raise DatasetError(f"{path.name} is not a readable gzip IDX file: {exc}") from None
    if len(data) != dims[0] * record:
        raise DatasetError(f"{path.name} is truncated: {len(data)} bytes of {dims[0] * record}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


@lru_cache(maxsize=16)
def _sha256_unchanged_file(path: Path, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def _sha256_installed_file(path: Path) -> str:
    """The digest of a file that rarely changes (the installed Fashion-MNIST), hashed once per process
    while its size and mtime stay the same."""
    stat = path.stat()
    return _sha256_unchanged_file(path, stat.st_size, stat.st_mtime_ns)


def _fashion_mnist(split: str, limit: int | None, pre: Preprocess, source: str) -> ImageDataset:
    root = Path(os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    images_file, labels_file = (root / name for name in _FMNIST_FILES[split])
    if not images_file.is_file() or not labels_file.is_file():
        raise DatasetError(
            f"Fashion-MNIST not found in {root}: install the Debian package dataset-fashion-mnist "
            "or set FASHION_MNIST_DIR"
        )
    images, labels = _read_idx(images_file, limit), _read_idx(labels_file, limit)
    fingerprint = f"{_sha256_installed_file(images_file)}:{len(images)}"
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]
    return ImageDataset(pre, source=source, fingerprint=fingerprint, array=images, labels=labels, classes=classes)


def _npz(path: Path, pre: Preprocess | None, source: str) -> tuple[np.ndarray, np.ndarray | None, bool]:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data.files:
                raise DatasetError(f"{source}: .npz must hold an array 'x' (and optionally 'y')")
            x = data["x"]
            y = data["y"] if "y" in data.files else None
    except DatasetError:
        raise
    except (ValueError, OSError, EOFError) as exc:
        raise DatasetError(f"{source}: not a readable .npz without pickles: {exception_reason(exc)}") from None
    if x.dtype == np.uint8:
        if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3, 4)):
            raise DatasetError(f"{source}: uint8 x must be N×H×W or N×H×W×C (C in 1, 3, 4), got {list(x.shape)}")
        normalized = False
    elif x.dtype in (np.float32, np.float64, np.float16):
        if x.ndim != 4:
            raise DatasetError(f"{source}: float x must be N×C×H×W (normalised), got {list(x.shape)}")
        if not np.isfinite(x).all():
            raise DatasetError(f"{source}: x holds NaN or infinite values")
        x = x.astype(np.float32)
        normalized = True
    else:
        raise DatasetError(f"{source}: x must be uint8 or float, got {x.dtype}")
    if len(x) == 0 or min(x.shape[1:]) == 0:
        raise DatasetError(f"{source}: x holds no images")
    if y is not None:
        check_labels(y, len(x), source)
    return x, y, normalized


def check_labels(y: np.ndarray, n: int, source: str) -> int:
    """Labels are class indices: 1-D, integer, one per image, in ``[0, MAX_CLASSES)``; returns the class
    count (largest label + 1). Checked before anything is stored: a uint64 ``2**64 - 1`` or an int64
    ``2**63 - 1`` is a valid array but no class count (it overflowed the database column)."""
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DatasetError(f"{source}: y must be a 1-D integer array of class labels, got {y.dtype} {list(y.shape)}")
    if len(y) != n:
        raise DatasetError(f"{source}: {len(y)} labels for {n} images ('y' needs one label per image)")
    if not len(y):
        return 0
    low, high = int(y.min()), int(y.max())
    if low < 0:
        raise DatasetError(f"{source}: labels must be non-negative class indices, found {low}")
    if high >= MAX_CLASSES:
        raise DatasetError(
            f"{source}: label {high} is out of range: labels are class indices below {MAX_CLASSES:,}"
        )
    return high + 1


def _image_folder(root: Path, pre: Preprocess, source: str, fingerprint: str, tempdir: Path | None) -> ImageDataset:
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and not any(
        p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in entries[0].iterdir()
    ):
        root = entries[0]  # archive with a single top-level folder around the class folders
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    if class_dirs:
        for index, class_dir in enumerate(class_dirs):
            for path in sorted(class_dir.rglob("*")):
                if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(path)
                    labels.append(index)
        classes = [p.name for p in class_dirs]
        label_array = np.asarray(labels, dtype=np.int64)
    else:
        files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        classes, label_array = None, None
    if not files:
        raise DatasetError(f"{source}: no images found (expected class folders of .png/.jpg files)")
    return ImageDataset(pre, source=source, fingerprint=fingerprint, files=files, labels=label_array,
                        classes=classes, tempdir=tempdir)


def load_dataset(source: str, preprocess: Preprocess, *, name: str | None = None) -> ImageDataset:
    """``fashion-mnist:train[:N]``, ``fashion-mnist:test[:N]``, a ``.npz``, an ImageFolder
    directory, or a ``.tar``/``.tar.gz``/``.zip`` of one. Messages call it ``name`` where given (the
    service passes the client's filename, never its scratch path)."""
    if not isinstance(source, str) or not source:
        raise DatasetError("dataset must be a path or 'fashion-mnist:train[:N]' / 'fashion-mnist:test'")
    match = FASHION_MNIST_SPEC.match(source)
    if match:
        limit = int(match.group(2)) if match.group(2) else None
        if limit == 0:
            raise DatasetError(f"{source}: N must be at least 1")
        return _fashion_mnist(match.group(1), limit, preprocess, source)
    if source.startswith("fashion-mnist"):
        raise DatasetError(f"{source!r}: use fashion-mnist:train, fashion-mnist:train:N or fashion-mnist:test")
    path = Path(source)
    label = name or source
    if not path.exists():
        raise DatasetError(f"dataset not found: {label}")
    if path.is_dir():
        return _image_folder(path, preprocess, label, f"dir:{path.resolve()}", None)
    if path.suffix.lower() == ".npz":
        x, y, normalized = _npz(path, preprocess, label)
        return ImageDataset(preprocess, source=label, fingerprint=sha256_file(path), array=x,
                            normalized=normalized, labels=y)
    if is_archive(path):
        tempdir = Path(tempfile.mkdtemp(prefix="vitq-data-"))
        safe_extract(path, tempdir / "root")
        return _image_folder(tempdir / "root", preprocess, label, sha256_file(path), tempdir)
    raise DatasetError(f"{label}: unsupported dataset format (use .npz, .tar, .tar.gz, .zip or a directory)")


def inspect_dataset(path: str | Path, max_decode: int = 64, *, name: str | None = None) -> dict[str, Any]:
    """Validate a dataset file and describe it; decodes up to ``max_decode`` images to prove they load.
    Messages call the dataset ``name`` where given."""
    probe = Preprocess(mean=(0.0,), std=(1.0,), input_size=(1, 8, 8))
    source = str(path)
    label = name or source
    if FASHION_MNIST_SPEC.match(source) or Path(source).suffix.lower() != ".npz":
        dataset = load_dataset(source, probe, name=name)
        if dataset.files is not None:
            shapes = []
            counter = PixelCounter(PixelBudget())
            for i in range(min(max_decode, len(dataset))):
                try:
                    with Image.open(dataset.files[i]) as img:
                        counter.admit(img, dataset.files[i].name)
                        img.load()
                        shapes.append([len(img.getbands()), img.height, img.width])
                except DatasetError as exc:
                    raise DatasetError(f"{label}: {exc.message}") from None
                except (UnidentifiedImageError, OSError, ValueError) as exc:
                    raise DatasetError(
                        f"{label}: cannot decode {dataset.files[i].name}: {exception_reason(exc)}"
                    ) from None
            image_shape = shapes[0] if shapes else None
            fmt = "imagefolder"
        else:
            image_shape = [1, *dataset.array.shape[1:3]]
            fmt = "fashion-mnist"
    else:
        x, y, normalized = _npz(Path(source), None, label)
        dataset = None
        shape = list(x.shape[1:])
        image_shape = shape if normalized else ([1, *shape] if x.ndim == 3 else [shape[2], shape[0], shape[1]])
        info = {"n": int(len(x)), "image_shape": image_shape, "has_labels": y is not None,
                "num_classes": int(y.max()) + 1 if y is not None and len(y) else None,
                "format": "npz-float" if normalized else "npz-uint8", "normalized": normalized}
        return info
    return {"n": len(dataset), "image_shape": image_shape, "has_labels": dataset.has_labels,
            "num_classes": dataset.num_classes, "format": fmt, "normalized": False,
            "classes": dataset.classes}
