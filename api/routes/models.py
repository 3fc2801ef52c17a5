"""``/v1/models``: built-in reference models and uploaded checkpoints (checked to fit before storing)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Response, UploadFile
from sqlalchemy import select

from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.errors import ApiError, not_found
from api.request_body import StrictRoute, loads_strict
from api.routes.datasets import check_storage_quota
from api.schemas import ModelPublic, ModelsPublic
from api.uploads import safe_filename, save_upload, scratch_dir
from core import CheckpointError, ModelSpec, ModelSpecError, list_builtin_models, resolve_model_spec
from core.models import (
    check_checkpoint_fits,
    check_parameter_count,
    looks_like_safetensors,
    pickle_refusal,
    unwrap_state_dict,
    write_safetensors,
)
from core.timm_kwargs import check_json_shape
from service import blob_gc
from service.db import for_update
from service.job_inputs import refuse_pretrained
from service.storage import store_then_record
from service.tables import Model, new_id

router = APIRouter(prefix="/v1/models", tags=["models"], route_class=StrictRoute)
NOTE = (
    'A job\'s model is a built-in id, an uploaded model id, or {"timm_name", "timm_kwargs"}: '
    "any timm ViT, DeiT or Swin name is accepted, with overridden sizes (e.g. img_size, patch_size, "
    "in_chans, num_classes)."
)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def _builtin_public(m: dict[str, Any]) -> ModelPublic:
    return ModelPublic(
        id=m["id"],
        kind="builtin",
        timm_name=m["timm_name"],
        timm_kwargs=m.get("timm_kwargs") or {},
        preprocess=m.get("preprocess"),
        fp_top1=m.get("fp_top1"),
    )


def _upload_public(row: Model) -> ModelPublic:
    return ModelPublic(
        id=row.id,
        kind="upload",
        timm_name=row.timm_name,
        timm_kwargs=row.timm_kwargs,
        preprocess=row.preprocess,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        filename=row.filename,
        created_at=row.created_at,
    )


def _json_object(value: str | None, field: str) -> dict[str, Any] | None:
    if value is None or value.strip() == "":
        return None
    try:
        parsed = loads_strict(value)
    except json.JSONDecodeError as exc:
        raise ApiError(422, "invalid_request", f"{field} is not valid JSON: {exc.msg}") from None
    except RecursionError:  # the parser recurses per level; the form field's length allows thousands
        raise ApiError(422, "invalid_request", f"{field} is nested too deeply") from None
    if not isinstance(parsed, dict):
        raise ApiError(422, "invalid_request", f"{field} must be a JSON object")
    try:
        check_json_shape(parsed, field)
    except ModelSpecError as exc:
        raise ApiError(422, "invalid_request", exc.message) from None
    return parsed


def _to_safetensors(raw: Path, filename: str, dest: Path) -> None:
    """A safetensors upload as it is (``check_checkpoint_fits`` reads its header), or a .pth state dict
    loaded ``weights_only`` (memory-mapped where the file allows) and written as safetensors tensor by
    tensor."""
    import torch

    if looks_like_safetensors(raw):
        raw.rename(dest)
        return
    if not filename.lower().endswith(PICKLE_SUFFIXES):
        raise ApiError(
            422, "invalid_checkpoint", "the file is not safetensors (a .pth state dict is accepted as well)"
        )
    try:
        try:
            obj = torch.load(str(raw), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            obj = torch.load(str(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for code-running pickles, others for garbage
        raise ApiError(422, "invalid_checkpoint", f"refusing to load {filename}: {pickle_refusal(exc)}") from None
    obj = unwrap_state_dict(obj)
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise ApiError(422, "invalid_checkpoint", "the .pth file is not a state dict of named tensors")
    try:
        write_safetensors(obj, dest)
    except ModelSpecError as exc:
        raise ApiError(422, "invalid_checkpoint", exc.message) from None


def _spec(timm_name: str, kwargs: dict[str, Any], prep: dict[str, Any] | None, max_parameters: int) -> ModelSpec:
    """The architecture an upload claims, checked before its bytes are copied: known timm name, no
    ``pretrained``, at most ``max_parameters`` (counted on the meta device)."""
    spec_dict: dict[str, Any] = {"timm_name": timm_name, "timm_kwargs": kwargs}
    if prep is not None:
        spec_dict["preprocess"] = prep
    try:
        refuse_pretrained(kwargs)
        spec = resolve_model_spec(spec_dict)
        check_parameter_count(spec, max_parameters)
    except ModelSpecError as exc:
        raise ApiError(422, "invalid_model", exc.message) from None
    return spec


@router.post("", status_code=201, summary="Upload a checkpoint with its timm name and kwargs")
def upload_model(
    file: Annotated[UploadFile, File(description="safetensors (or a .pth state dict, loaded weights-only)")],
    timm_name: Annotated[str, Form(min_length=1, max_length=200)],
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    tenant: TenantDep,
    timm_kwargs: Annotated[str | None, Form(max_length=20_000, description="JSON object")] = None,
    preprocess: Annotated[str | None, Form(max_length=20_000, description="JSON object")] = None,
) -> ModelPublic:
    kwargs = _json_object(timm_kwargs, "timm_kwargs") or {}
    prep = _json_object(preprocess, "preprocess")
    filename = safe_filename(file.filename, "model.safetensors")
    spec = _spec(timm_name, kwargs, prep, settings.max_model_parameters)
    with scratch_dir(settings.resolved_cache_dir / "uploads") as tmp:
        raw = tmp / "upload"
        size = save_upload(file, raw, max_bytes=settings.max_upload_bytes)
        check_storage_quota(session, settings, tenant, size)
        weights = tmp / "model.safetensors"
        _to_safetensors(raw, filename, weights)
        try:  # names, shapes and dtypes from the header against the meta-device model; bounded memory
            check_checkpoint_fits(spec, weights, max_parameters=settings.max_model_parameters, name=filename)
        except CheckpointError as exc:
            raise ApiError(422, "invalid_checkpoint", exc.message) from None
        except ModelSpecError as exc:
            raise ApiError(422, "invalid_model", f"the checkpoint does not fit {timm_name}: {exc.message}") from None
        row = store_then_record(
            session,
            store,
            weights,
            check=lambda: check_storage_quota(session, settings, tenant, size, lock=True),
            make_row=lambda sha, _: Model(
                id=new_id("mdl"),
                tenant_id=tenant.id,
                filename=filename,
                timm_name=timm_name,
                timm_kwargs=kwargs,
                preprocess=prep,
                sha256=sha,
                size_bytes=size,
            ),
        )
    response.headers["Location"] = f"/v1/models/{row.id}"
    return _upload_public(row)


@router.get("", summary="Built-in reference models and your uploads")
def list_models(session: SessionDep, tenant: TenantDep) -> ModelsPublic:
    rows = session.scalars(select(Model).where(Model.tenant_id == tenant.id).order_by(Model.id.desc())).all()
    data = [_builtin_public(m) for m in list_builtin_models()] + [_upload_public(r) for r in rows]
    return ModelsPublic(data=data, note=NOTE)


@router.get("/{model_id}", summary="A built-in or uploaded model")
def read_model(model_id: str, session: SessionDep, tenant: TenantDep) -> ModelPublic:
    for m in list_builtin_models():
        if m["id"] == model_id:
            return _builtin_public(m)
    row = session.scalar(select(Model).where(Model.id == model_id, Model.tenant_id == tenant.id))
    if row is None:
        raise not_found("model", model_id)
    return _upload_public(row)


@router.delete("/{model_id}", status_code=204, summary="Delete an uploaded model not used by an unfinished job")
def delete_model(model_id: str, session: SessionDep, store: StoreDep, tenant: TenantDep) -> Response:
    """409 while a queued or running job uses it (built-in models cannot be deleted); the blob goes only
    when no row (any tenant's) names it."""
    if any(m["id"] == model_id for m in list_builtin_models()):
        raise ApiError(409, "builtin_model", f"{model_id!r} is a built-in model and cannot be deleted")
    # FOR UPDATE before the in-use check: a submit that read the row (FOR SHARE) commits its job first.
    row = session.scalar(for_update(session, select(Model).where(Model.id == model_id, Model.tenant_id == tenant.id)))
    if row is None:
        raise not_found("model", model_id)
    in_use = blob_gc.active_jobs_using(session, tenant_id=tenant.id, model_id=row.id)
    if in_use:
        raise ApiError(409, "model_in_use", f"model {row.id} is used by {in_use} queued or running job(s)")
    blob_gc.delete_upload_and_release(session, store, row)
    return Response(status_code=204)
