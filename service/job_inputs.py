"""Turn a job request into what a worker runs, rejecting bad input before anything is queued.

No web imports: the worker calls ``spec_from_stored`` and ``data_path`` with the same rules.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import DatasetError, ModelSpecError, QuantConfig, list_builtin_models, resolve_model_spec
from core.data import FASHION_MNIST_SPEC
from core.hub_weights import HubAccess, HubPolicy, hub_config, require_cached, unavailable
from core.model_ids import parse_model_id
from core.models import (
    MAX_PARAMETERS,
    PRETRAINED_KWARG_REFUSED,
    check_parameter_count,
    model_num_classes,
    no_weights_error,
)
from service.archives import Limits, materialize_dataset
from service.db import for_update
from service.storage import ArtifactStore
from service.tables import Dataset, Model

FMNIST_SIZES = {"train": 60_000, "test": 10_000}
FMNIST_INFO = {"image_shape": [1, 28, 28], "num_classes": 10, "has_labels": True, "normalized": False}


@lru_cache(maxsize=1)
def builtin_ids() -> frozenset[str]:
    """Cached: the built-ins are files bundled with the package, and listing them re-reads them."""
    return frozenset(m["id"] for m in list_builtin_models())


@lru_cache(maxsize=32)
def _builtin_spec(model_id: str) -> Any:
    """Cached: resolving a built-in re-reads its bundled JSON, once per ``POST /v1/jobs`` otherwise.
    Specs are frozen dataclasses, so sharing one is safe."""
    return resolve_model_spec(model_id)


@dataclass(frozen=True)
class ResolvedModel:
    key: str
    """What results are grouped by: built-in id, uploaded model id, or the model id as written."""
    stored: dict[str, Any]
    """What the job row keeps; ``spec_from_stored`` rebuilds the core spec from it."""
    spec: Any
    """The core spec; ``None`` for a hub repository whose config the worker fetches (online policy, not yet
    in the cache): its architecture and fit are checked there, before any reconstruction."""


NO_HUB = HubPolicy(HubAccess.OFF, Path("/nonexistent"))
"""The policy of a caller that names none: no hub weights."""


def resolve_model(
    session: Session,
    store: ArtifactStore,
    *,
    tenant_id: str,
    ref: str | dict,
    cache_dir: Path,
    max_parameters: int = MAX_PARAMETERS,
    hub: HubPolicy = NO_HUB,
) -> ResolvedModel:
    """A job's model (any model id form, an uploaded model id, or ``{timm_name, timm_kwargs, weights,
    preprocess}``), checked at submit without touching the network: unknown names (with close matches),
    organisations off the allow-list, hub access ``off``, weights not in a ``cache-only`` cache, and timm
    architectures without weights are refused here, at once."""
    if isinstance(ref, str) and ref in builtin_ids():
        stored = {"kind": "builtin", "id": ref}
        return ResolvedModel(ref, stored, spec_from_stored(stored, store, cache_dir))
    if isinstance(ref, str) and ref.startswith(UPLOAD_PREFIX):
        return _resolve_upload(session, store, tenant_id=tenant_id, ref=ref, cache_dir=cache_dir)
    fields = ref if isinstance(ref, dict) else {"timm_name": ref}
    stored = {"kind": "timm", "timm_name": fields["timm_name"], "timm_kwargs": fields.get("timm_kwargs") or {}}
    for name in ("weights", "preprocess"):
        if fields.get(name) is not None:
            stored[name] = fields[name]
    refuse_pretrained(stored["timm_kwargs"])
    parsed = parse_model_id(stored["timm_name"], builtin_ids())
    local = hub.without_network()  # the API reads the cache at most; the worker downloads
    if parsed.kind == "hub":  # the architecture is in the repository's config.json
        hub.check_allowed(parsed.hub, parsed.text)
        if hub_config(local, parsed.hub, parsed.text) is None:
            if hub.access != HubAccess.ONLINE:
                raise unavailable(parsed.hub, parsed.text, f"the model cache {hub.cache_dir} does not hold it", hub)
            return ResolvedModel(parsed.text, stored, None)
    spec = spec_from_stored(stored, store, cache_dir, hub=local)
    check_buildable(spec, max_parameters=max_parameters)  # a spec timm cannot build: its own, precise 422
    if spec.weights_kind == "none":
        raise no_weights_error(spec)
    if spec.weights_kind == "hub":
        hub.check_allowed(spec.hub, parsed.text)
        if hub.access != HubAccess.ONLINE:
            require_cached(local, spec.hub, parsed.text)  # cache-only: refused now if not cached
    return ResolvedModel(parsed.text, stored, spec)


UPLOAD_PREFIX = "mdl_"
"""Uploaded model ids (``service.tables.new_id("mdl")``)."""


def _resolve_upload(session: Session, store: ArtifactStore, *, tenant_id: str, ref: str,
                    cache_dir: Path) -> ResolvedModel:
    # FOR SHARE (SQLite: the write lock) until the job row commits: a concurrent DELETE of the model
    # waits, then sees the job (409).
    row = session.scalar(
        for_update(session, select(Model).where(Model.id == ref, Model.tenant_id == tenant_id), read=True)
    )
    if row is None:
        raise ModelSpecError(
            f"unknown model {ref!r}: no uploaded model of this tenant has that id; use a built-in id "
            f"({', '.join(sorted(builtin_ids()))}), a timm or Hub model id, or an uploaded model id"
        )
    stored = {
        "kind": "upload",
        "id": row.id,
        "sha256": row.sha256,
        "timm_name": row.timm_name,
        "timm_kwargs": row.timm_kwargs,
        "preprocess": row.preprocess,
    }
    return ResolvedModel(row.id, stored, spec_from_stored(stored, store, cache_dir))


PRETRAINED_REFUSED = PRETRAINED_KWARG_REFUSED


def refuse_pretrained(timm_kwargs: dict[str, Any]) -> None:
    """``timm_kwargs.pretrained`` is not how pretrained weights are asked for (the model id is): refused at
    once, before anything could reach for the hub."""
    if "pretrained" in timm_kwargs:
        raise ModelSpecError(PRETRAINED_REFUSED)


def check_buildable(spec: Any, *, max_parameters: int = MAX_PARAMETERS) -> int:
    """Count the architecture's parameters on the meta device (a few small builds whatever the depth, so
    the API's work per request is bounded); rejects kwargs timm does not take and models above
    ``max_parameters``. Returns the count."""
    return check_parameter_count(spec, max_parameters)


def model_file(store: ArtifactStore, sha256: str, cache_dir: Path) -> Path:
    """The stored weights under a ``.safetensors`` name (core picks the reader by suffix)."""
    target = cache_dir / "models" / f"{sha256}.safetensors"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        os.close(fd)
        shutil.copyfile(store.local_path(sha256), tmp)
        os.replace(tmp, target)
    return target


def spec_from_stored(stored: dict[str, Any], store: ArtifactStore, cache_dir: Path,
                     hub: HubPolicy = NO_HUB) -> Any:
    """The core spec of a job row's model; a hub id's config is read through ``hub`` (the worker's policy:
    it may download it when online)."""
    kind = stored["kind"]
    if kind == "builtin":
        return _builtin_spec(stored["id"])
    spec: dict[str, Any] = {"timm_name": stored["timm_name"], "timm_kwargs": stored["timm_kwargs"]}
    if stored.get("preprocess"):
        spec["preprocess"] = stored["preprocess"]
    if stored.get("weights"):
        spec["weights"] = stored["weights"]
    if kind == "upload":
        spec["checkpoint"] = str(model_file(store, stored["sha256"], cache_dir))
    return resolve_model_spec(spec, hub)


def describe_data(session: Session, *, tenant_id: str, ref: str, role: str) -> dict[str, Any]:
    """Shape facts about a data reference; raises DatasetError for unknown or malformed ones."""
    match = FASHION_MNIST_SPEC.match(ref)
    if match:
        split, count = match.group(1), match.group(2)
        if count is not None and not 1 <= int(count) <= FMNIST_SIZES[split]:
            raise DatasetError(
                f"{role}: fashion-mnist:{split} has {FMNIST_SIZES[split]} images, asked {count}"
            )
        return dict(FMNIST_INFO, n=int(count) if count else FMNIST_SIZES[split])
    if ref.startswith("fashion-mnist"):
        raise DatasetError(f"{role}: {ref!r} is not fashion-mnist:train[:N] or fashion-mnist:test[:N]")
    # FOR SHARE (SQLite: the write lock) until the job row commits: a concurrent DELETE of the dataset
    # waits, then sees the job (409).
    row = session.scalar(
        for_update(session, select(Dataset).where(Dataset.id == ref, Dataset.tenant_id == tenant_id), read=True)
    )
    if row is None:
        raise DatasetError(
            f"{role}: unknown dataset {ref!r}; "
            "use an uploaded dataset id or fashion-mnist:train[:N] / fashion-mnist:test[:N]"
        )
    return {
        "image_shape": row.image_shape,
        "num_classes": row.num_classes,
        "has_labels": row.has_labels,
        "n": row.n,
        "normalized": row.normalized,
    }


def _channels(image_shape: list[int]) -> int:
    return 1 if len(image_shape) == 2 else int(image_shape[0])


def check_data_fits(spec: Any, info: dict[str, Any], *, role: str) -> None:
    """Core converts 1↔C channels and resizes uint8 images; anything else that cannot fit is a 422. A spec
    of ``None`` (a hub config the worker fetches) is checked there."""
    if spec is None:
        if role == "evaluation" and not info.get("has_labels"):
            raise DatasetError("evaluation: the dataset has no labels, so accuracy cannot be measured")
        return
    input_size = [int(v) for v in spec.preprocess.input_size] if spec.preprocess is not None else None
    shape = [int(v) for v in info["image_shape"]]
    if input_size is not None:
        if info.get("normalized") and shape != input_size:
            raise DatasetError(
                f"{role}: normalised float images have shape {shape} but the model takes {input_size} (C×H×W)"
            )
        channels = _channels(shape)
        if channels != input_size[0] and 1 not in (channels, input_size[0]):
            raise DatasetError(
                f"{role}: images have {channels} channels (shape {shape}) but the model takes "
                f"{input_size[0]} (input_size {input_size})"
            )
    if role == "evaluation" and not info.get("has_labels"):
        raise DatasetError("evaluation: the dataset has no labels, so accuracy cannot be measured")
    num_classes = model_num_classes(spec)
    if num_classes and info.get("num_classes") and int(info["num_classes"]) > num_classes:
        raise DatasetError(
            f"{role}: the dataset has {info['num_classes']} classes but the model predicts {num_classes}"
        )


def target_base_config(target: dict[str, Any], *, method: str, preset: str, options: dict[str, Any]) -> QuantConfig:
    """The config a target job's trials start from (core validates the target: one rule, one home).

    Not resolved: each trial fills the preset's defaults for its own widths (6+ bits take fewer
    iterations). ``w_bits``/``a_bits`` are the search's first, smallest uniform widths.
    """
    from core.target_search import TargetSpec

    spec = TargetSpec.from_dict(target)
    w_bits, a_bits = spec.uniform_widths()[0]
    return QuantConfig(w_bits=w_bits, a_bits=a_bits, method=method, preset=preset, **options)


def data_path(session: Session, store: ArtifactStore, *, ref: str, cache_dir: Path, limits: Limits) -> str:
    """What core's ``load_dataset`` takes: the ref itself for fashion-mnist, else a local path."""
    if FASHION_MNIST_SPEC.match(ref):
        return ref
    row = session.get(Dataset, ref)
    if row is None:
        raise DatasetError(f"dataset {ref!r} no longer exists")
    return str(materialize_dataset(store, cache_dir, sha256=row.sha256, fmt=row.format, limits=limits))
