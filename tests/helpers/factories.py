"""Test data: small Fashion-MNIST .npz files and archives (good and malicious), and API helpers."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

FMNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
REPO = Path(__file__).resolve().parents[2]
BUILTIN_WEIGHTS = REPO / "core" / "builtin_models" / "fmnist-vit-tiny.safetensors"
FMNIST_TIMM = {
    "timm_name": "vit_tiny_patch16_224",
    "timm_kwargs": {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10},
    "preprocess": {"mean": [0.286], "std": [0.353], "input_size": [1, 28, 28]},
}


def fmnist(split: str = "test", n: int = 64, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    prefix = "t10k" if split == "test" else "train"
    with gzip.open(FMNIST_DIR / f"{prefix}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FMNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images[offset : offset + n].copy(), labels[offset : offset + n].astype(np.int64)


def write_npz(path: Path, n: int = 64, split: str = "test", offset: int = 0) -> Path:
    x, y = fmnist(split, n, offset)
    np.savez(path, x=x, y=y)
    return path


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_imagefolder_zip(path: Path, n: int = 20) -> Path:
    x, y = fmnist("test", n)
    with zipfile.ZipFile(path, "w") as zf:
        for i, (image, label) in enumerate(zip(x, y, strict=True)):
            zf.writestr(f"data/class_{label}/{i}.png", png_bytes(image))
    return path


def write_imagefolder_tar(path: Path, n: int = 20) -> Path:
    x, y = fmnist("test", n)
    with tarfile.open(path, "w:gz") as tf:
        for i, (image, label) in enumerate(zip(x, y, strict=True)):
            data = png_bytes(image)
            info = tarfile.TarInfo(f"class_{label}/{i}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def tar_with(path: Path, members: list[tarfile.TarInfo], payload: bytes = b"x") -> Path:
    with tarfile.open(path, "w") as tf:
        for info in members:
            if info.isfile():
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            else:
                tf.addfile(info)
    return path


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
