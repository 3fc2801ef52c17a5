"""The sha256 of a file, read in 1 MiB blocks: the one hashing helper that datasets, checkpoints, hub
weights and exports share (a file's identity in reports, the artifact store and the unit cache)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
