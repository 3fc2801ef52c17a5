"""Carrying weights into the model cache by hand (``vitq models import``), in the Hugging Face layout.

Two things can be imported:

- a Hugging Face cache (a directory holding ``models--org--repo`` folders, e.g. one ``vitq models pull
  --cache DIR`` filled on a connected machine): its repositories are copied in, blobs, refs and snapshots,
  as ``huggingface_hub`` wrote them;
- a local timm-format snapshot (``config.json`` + ``model.safetensors``) or a single weights file, under a
  repository id the importer names: its files become a snapshot whose commit id is derived from their
  sha256 (so importing the same files twice gives the same commit), with ``refs/main`` pointing at it.

``huggingface_hub.try_to_load_from_cache`` then finds them exactly as if they had been downloaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from core.errors import ModelSpecError
from core.file_hash import sha256_file
from core.hub_weights import CONFIG_FILE, WEIGHTS_FILES
from core.model_ids import REPO_ID_PATTERN

REPO_PREFIX = "models--"


def repo_folder(cache_dir: Path, repo_id: str) -> Path:
    """``models--org--repo``: where the Hugging Face cache keeps a model repository."""
    return cache_dir / (REPO_PREFIX + repo_id.replace("/", "--"))


def cached_repositories(cache_dir: Path) -> list[dict[str, object]]:
    """The model repositories in a cache: ``{repo_id, revisions: {ref: commit}, snapshots, bytes}``."""
    out = []
    if not cache_dir.is_dir():
        return out
    for folder in sorted(cache_dir.glob(REPO_PREFIX + "*")):
        repo_id = folder.name.removeprefix(REPO_PREFIX).replace("--", "/", 1)
        refs = {p.name: p.read_text().strip() for p in (folder / "refs").glob("*") if p.is_file()}
        snapshots = sorted(p.name for p in (folder / "snapshots").glob("*") if p.is_dir())
        size = sum(p.stat().st_size for p in (folder / "blobs").glob("*") if p.is_file())
        out.append({"repo_id": repo_id, "revisions": refs, "snapshots": snapshots, "bytes": size})
    return out


def _copy_atomic(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".import-")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def import_hf_cache(source: Path, cache_dir: Path) -> list[str]:
    """Copy every ``models--*`` repository of the cache at ``source`` into ``cache_dir`` (blobs first, so a
    snapshot link never points at a missing blob); returns the repository ids."""
    imported = []
    for folder in sorted(source.glob(REPO_PREFIX + "*")):
        target = cache_dir / folder.name
        for blob in sorted((folder / "blobs").glob("*")):
            if blob.is_file() and not (target / "blobs" / blob.name).exists():
                _copy_atomic(blob, target / "blobs" / blob.name)
        for snapshot in sorted((folder / "snapshots").glob("*")):
            for entry in sorted(snapshot.rglob("*")):
                if entry.is_dir():
                    continue
                link = target / "snapshots" / snapshot.name / entry.relative_to(snapshot)
                if link.exists() or link.is_symlink():
                    continue
                link.parent.mkdir(parents=True, exist_ok=True)
                resolved = entry.resolve()
                if resolved.parent.name == "blobs" and (target / "blobs" / resolved.name).exists():
                    link.symlink_to(os.path.relpath(target / "blobs" / resolved.name, link.parent))
                else:
                    _copy_atomic(entry, link)
        for ref in sorted((folder / "refs").rglob("*")):
            if ref.is_file():
                _copy_atomic(ref, target / "refs" / ref.relative_to(folder / "refs"))
        imported.append(folder.name.removeprefix(REPO_PREFIX).replace("--", "/", 1))
    return imported


def import_snapshot(source: Path, cache_dir: Path, repo_id: str, revision: str = "main") -> str:
    """Put a timm-format snapshot directory (or one weights file) into the cache as ``repo_id``; returns
    the snapshot's commit id."""
    if not REPO_ID_PATTERN.match(repo_id):
        raise ModelSpecError(f"{repo_id!r} is not a repository id (org/repo)")
    files = [source] if source.is_file() else [source / n for n in (CONFIG_FILE, *WEIGHTS_FILES)
                                                if (source / n).is_file()]
    if not any(f.name in WEIGHTS_FILES or source.is_file() for f in files):
        raise ModelSpecError(f"{source} holds none of {', '.join(WEIGHTS_FILES)}")
    if source.is_file() and source.name not in WEIGHTS_FILES:
        raise ModelSpecError(f"a weights file to import must be named {' or '.join(WEIGHTS_FILES)}")
    hashes = {f.name: sha256_file(f) for f in files}
    commit = hashlib.sha1("".join(f"{n}:{h}\n" for n, h in sorted(hashes.items())).encode()).hexdigest()
    folder = repo_folder(cache_dir, repo_id)
    for f in files:
        blob = folder / "blobs" / hashes[f.name]
        if not blob.exists():
            _copy_atomic(f, blob)
        link = folder / "snapshots" / commit / f.name
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    ref = folder / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    return commit
