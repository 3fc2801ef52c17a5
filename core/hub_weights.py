"""Pretrained weights from the Hugging Face Hub, under an operator's policy, into one cache.

The cache is the Hugging Face cache layout (``models--org--repo/{blobs,refs,snapshots}``) that
``huggingface_hub`` itself writes and reads, so a cache filled by ``vitq models pull`` on a connected
machine, by ``huggingface-cli download`` or by timm can be carried to an air-gapped site and used there.

Policy (``HubPolicy.access``):

- ``off``: no hub weights at all (refused at once);
- ``cache-only``: what the cache holds, never the network (``local_files_only``);
- ``online``: the cache, else a download from ``endpoint`` (``HF_ENDPOINT``: the public Hub or an
  internal mirror) with the operator's ``HF_TOKEN``, never a user's.

An allow-list of organisations (``allowed_orgs``; empty: any) is checked before anything else. A refusal
or a miss is one immediate error naming the three ways to get the weights; no retry loop: a mirror that
does not answer within ``timeout_s`` is reported as unreachable.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from core.errors import ModelSpecError
from core.file_hash import sha256_file
from core.model_ids import HubRef

WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
"""The weights files of a timm-format repository, in timm's order of preference."""
CONFIG_FILE = "config.json"
MAX_CONFIG_BYTES = 1 << 20


class HubAccess(StrEnum):
    """How far a process may go for hub weights."""

    OFF = "off"
    """No hub weights: a hub id is refused at once."""
    CACHE_ONLY = "cache-only"
    """Only weights already in the model cache; the network is never used."""
    ONLINE = "online"
    """The cache, else a download from ``HF_ENDPOINT`` (the Hub or an internal mirror)."""


class WeightsUnavailableError(ModelSpecError):
    """The pretrained weights cannot be had under this policy (off, not cached, hub unreachable)."""

    code = "weights_unavailable"


class ModelNotAllowedError(ModelSpecError):
    """The repository's organisation is not on the operator's allow-list."""

    code = "model_not_allowed"


def default_cache_dir() -> Path:
    """``VITQ_MODEL_CACHE``, else Hugging Face's own cache (``HF_HUB_CACHE``, ``~/.cache/huggingface/hub``)."""
    configured = os.environ.get("VITQ_MODEL_CACHE")
    if configured:
        return Path(configured).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def parse_orgs(text: str | None) -> tuple[str, ...]:
    """A comma list of organisations (``timm, my-company``) as a sorted tuple; empty means any."""
    return tuple(sorted({o.strip() for o in (text or "").split(",") if o.strip()}))


@dataclass(frozen=True)
class HubPolicy:
    """The operator's hub rules for one process (the CLI reads them from the environment)."""

    access: HubAccess = HubAccess.CACHE_ONLY
    cache_dir: Path = field(default_factory=default_cache_dir)
    allowed_orgs: tuple[str, ...] = ()
    endpoint: str | None = None
    """``None``: ``HF_ENDPOINT`` at call time, else the public Hub."""
    token: str | None = None
    """The operator's ``HF_TOKEN`` (``None``: anonymous)."""
    timeout_s: float = 10.0

    @classmethod
    def from_env(cls) -> HubPolicy:
        """``VITQ_HUB_ACCESS`` (default ``cache-only``: nothing leaves the machine unless asked),
        ``VITQ_MODEL_CACHE``, ``VITQ_HUB_ALLOWED_ORGS``, ``HF_ENDPOINT``, ``HF_TOKEN``."""
        raw = os.environ.get("VITQ_HUB_ACCESS", HubAccess.CACHE_ONLY.value).strip().lower()
        try:
            access = HubAccess(raw)
        except ValueError:
            raise ModelSpecError(f"VITQ_HUB_ACCESS must be off, cache-only or online, not {raw!r}") from None
        return cls(access, default_cache_dir(), parse_orgs(os.environ.get("VITQ_HUB_ALLOWED_ORGS")),
                   os.environ.get("HF_ENDPOINT") or None, os.environ.get("HF_TOKEN") or None)

    def without_network(self) -> HubPolicy:
        """The same rules for a process that must not download (the API reads the cache at most)."""
        access = HubAccess.OFF if self.access == HubAccess.OFF else HubAccess.CACHE_ONLY
        return HubPolicy(access, self.cache_dir, self.allowed_orgs, self.endpoint, None, self.timeout_s)

    def check_allowed(self, ref: HubRef, model_id: str | None = None) -> None:
        """Refuse a repository outside the allow-list, or any hub id when access is off."""
        shown = model_id or ref.repo_id
        if self.allowed_orgs and ref.organisation not in self.allowed_orgs:
            raise ModelNotAllowedError(
                f"model {shown!r}: organisation {ref.organisation!r} is not on this service's allow-list "
                f"({', '.join(self.allowed_orgs)}); ask the operator, or upload the weights as a checkpoint"
            )
        if self.access == HubAccess.OFF:
            raise unavailable(ref, model_id, "hub access is off here (VITQ_HUB_ACCESS=off)", self)


def three_ways(model_id: str, cache_dir: Path | None) -> str:
    cache = f" ({cache_dir})" if cache_dir is not None else ""
    return (
        "Get the weights one of three ways: (1) the operator fills the model cache VITQ_MODEL_CACHE" + cache
        + " or sets VITQ_HUB_ACCESS=online (HF_ENDPOINT may name an internal mirror); (2) on a connected machine "
        f"run `vitq models pull {model_id} --cache DIR`, carry DIR here and run `vitq models import DIR`; "
        "(3) upload the weights as a checkpoint (POST /v1/models or `vitq models upload`) and name its model id"
    )


def unavailable(ref: HubRef, model_id: str | None, why: str, policy: HubPolicy | None) -> WeightsUnavailableError:
    shown = model_id or f"hf-hub:{ref.repo_id}" + (f"@{ref.revision}" if ref.revision else "")
    return WeightsUnavailableError(
        f"pretrained weights for {shown!r} ({ref.repo_id}) are not available: {why}. "
        + three_ways(shown, policy.cache_dir if policy is not None else None)
    )


@dataclass(frozen=True)
class FetchedWeights:
    """Weights in the local cache and what the report records about them."""

    repo_id: str
    revision: str | None
    commit: str
    snapshot_dir: Path
    weights_file: Path
    files: tuple[dict[str, Any], ...]
    """``{name, sha256, bytes}`` of every file used (config and weights)."""
    config: dict[str, Any] | None
    downloaded: bool
    """Whether any file came over the network in this call (``False``: all from the cache)."""

    def provenance(self) -> dict[str, Any]:
        """What the report and the checkpoint header keep (no local paths)."""
        return {"source": "hf-hub", "repo_id": self.repo_id, "revision": self.revision or "main",
                "commit": self.commit, "files": [dict(f) for f in self.files],
                "weights_sha256": next(f["sha256"] for f in self.files if f["name"] == self.weights_file.name)}


ProgressFn = Callable[[dict[str, Any]], None]


def _progress_bar_class(progress: ProgressFn | None, name: str, index: int, total_files: int) -> type | None:
    """A tqdm stand-in for ``hf_hub_download(tqdm_class=…)`` that reports bytes as a ``fetch_weights`` event."""
    if progress is None:
        return None

    class _Bar:
        def __init__(self, *_args: Any, total: int | None = None, initial: int = 0, **_kwargs: Any) -> None:
            self.total = int(total or 0)
            self.n = int(initial or 0)
            self._emit()

        def _emit(self) -> None:
            progress({"stage": "fetch_weights", "unit": name, "index": index, "total": total_files,
                      "loss": None, "done": self.n, "total_steps": self.total})

        def update(self, n: int | float = 1) -> None:
            self.n += int(n)
            self._emit()

        def __enter__(self) -> _Bar:
            return self

        def __exit__(self, *_exc: object) -> None:
            self.close()

        def close(self) -> None:
            pass

        def set_description(self, *_a: Any, **_k: Any) -> None:
            pass

        def refresh(self, *_a: Any, **_k: Any) -> None:
            pass

        def reset(self, total: int | None = None) -> None:
            self.total, self.n = int(total or 0), 0

    return _Bar


@contextlib.contextmanager
def _network_allowed() -> Iterator[None]:
    """Service processes set ``HF_HUB_OFFLINE`` (service/offline.py) so no other path reaches the hub;
    an online fetch lifts it for the duration of the download only."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _download(policy: HubPolicy, ref: HubRef, filename: str, progress: ProgressFn | None, index: int,
              total_files: int) -> tuple[Path | None, bool]:
    """One file: ``(path, downloaded)``, or ``(None, False)`` when the repository has no such file."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    revision = ref.revision or "main"
    cached = try_to_load_from_cache(ref.repo_id, filename, cache_dir=str(policy.cache_dir), revision=revision)
    if isinstance(cached, str):
        return Path(cached), False
    if policy.access != HubAccess.ONLINE:
        return None, False
    endpoint = policy.endpoint or os.environ.get("HF_ENDPOINT") or None
    where = endpoint or "huggingface.co"
    try:
        with _network_allowed():
            # One HEAD without retries first: hf_hub_download retries a refused or timed-out connection with
            # backoff (23 s against a closed port), and an unreachable hub must be an immediate error.
            get_hf_file_metadata(hf_hub_url(ref.repo_id, filename, revision=revision, endpoint=endpoint),
                                 token=policy.token or False, timeout=policy.timeout_s, endpoint=endpoint,
                                 retry_on_errors=False)
            path = hf_hub_download(
                ref.repo_id, filename, revision=revision, cache_dir=str(policy.cache_dir), endpoint=endpoint,
                token=policy.token or False, etag_timeout=policy.timeout_s,
                tqdm_class=_progress_bar_class(progress, filename, index, total_files),
            )
    except (GatedRepoError, RepositoryNotFoundError):
        raise ModelSpecError(
            f"the Hub{' mirror ' + endpoint if endpoint else ''} has no repository {ref.repo_id!r} "
            "(or it is private and this service's token may not read it)"
        ) from None
    except RevisionNotFoundError:
        raise ModelSpecError(f"repository {ref.repo_id!r} has no revision {revision!r}") from None
    except LocalEntryNotFoundError as exc:  # the network failed and the cache has nothing
        raise unavailable(ref, None, f"the hub at {where} could not be reached "
                          f"({str(exc).splitlines()[0][:200]})", policy) from None
    except EntryNotFoundError:
        return None, False
    except HfHubHTTPError as exc:
        raise unavailable(ref, None, f"the hub at {where} answered {str(exc).splitlines()[0][:200]}",
                          policy) from None
    except Exception as exc:  # httpx2 connect/read errors and timeouts: the hub cannot be reached
        raise unavailable(ref, None, f"the hub at {where} could not be reached ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else 'no answer'})", policy) from None
    return Path(path), True


def _read_config(path: Path) -> dict[str, Any]:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ModelSpecError(f"{path.name} of the repository is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSpecError(f"the repository's config.json is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("architecture"), str):
        raise ModelSpecError("the repository's config.json names no timm architecture (not a timm-format repo)")
    return data


def hub_config(policy: HubPolicy, ref: HubRef, model_id: str | None = None) -> dict[str, Any] | None:
    """The repository's timm ``config.json`` (architecture, model_args, pretrained_cfg). ``None`` when it
    is not cached and the policy would have to download it (the caller defers to the worker)."""
    policy.check_allowed(ref, model_id)
    path, _ = _download(policy, ref, CONFIG_FILE, None, 0, 1)
    if path is None:
        if policy.access == HubAccess.ONLINE:
            raise ModelSpecError(f"repository {ref.repo_id!r} has no config.json: not a timm-format repository")
        return None
    return _read_config(path)


def require_cached(policy: HubPolicy, ref: HubRef, model_id: str | None = None) -> None:
    """Refuse, at once, hub weights that a policy without network cannot have: the allow-list, access
    ``off``, or no weights file of the repository in the cache (nothing is read or hashed)."""
    from huggingface_hub import try_to_load_from_cache

    policy.check_allowed(ref, model_id)
    for name in (ref.filename,) if ref.filename else WEIGHTS_FILES:
        found = try_to_load_from_cache(ref.repo_id, name, cache_dir=str(policy.cache_dir),
                                       revision=ref.revision or "main")
        if isinstance(found, str):
            return
    raise unavailable(ref, model_id, f"the model cache {policy.cache_dir} does not hold it "
                      f"(hub access: {policy.access.value})", policy)


def fetch_weights(policy: HubPolicy, ref: HubRef, *, model_id: str | None = None, need_config: bool = False,
                  progress: ProgressFn | None = None) -> FetchedWeights:
    """The repository's config (when it has one) and weights file in the cache, downloading what is
    missing when the policy is online; sha256 of each file used."""
    policy.check_allowed(ref, model_id)
    names = (ref.filename,) if ref.filename else WEIGHTS_FILES
    total_files = 1 + len(names[:1])
    downloaded = False
    config_path, got = _download(policy, ref, CONFIG_FILE, progress, 0, total_files)
    downloaded |= got
    if config_path is None and need_config:
        if policy.access == HubAccess.ONLINE:
            raise ModelSpecError(f"repository {ref.repo_id!r} has no config.json: not a timm-format repository")
        raise unavailable(ref, model_id, f"the model cache {policy.cache_dir} does not hold it "
                          f"(hub access: {policy.access.value})", policy)
    weights_path = None
    for name in names:
        weights_path, got = _download(policy, ref, name, progress, 1, total_files)
        downloaded |= got
        if weights_path is not None:
            break
    if weights_path is None:
        if policy.access == HubAccess.ONLINE:
            raise ModelSpecError(f"repository {ref.repo_id!r} holds none of {', '.join(names)}")
        raise unavailable(ref, model_id, f"the model cache {policy.cache_dir} does not hold it "
                          f"(hub access: {policy.access.value})", policy)
    used = [p for p in (config_path, weights_path) if p is not None]
    files = tuple({"name": p.name, "sha256": sha256_file(p), "bytes": p.stat().st_size} for p in used)
    return FetchedWeights(ref.repo_id, ref.revision, weights_path.parent.name, weights_path.parent, weights_path,
                          files, _read_config(config_path) if config_path is not None else None, downloaded)
