"""``/v1/datasets``: validated uploads (ImageFolder archive or .npz), listing, deletion."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Response, UploadFile
from sqlalchemy import select

from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.errors import ApiError, not_found
from api.request_body import StrictRoute
from api.schemas import DatasetPublic, DatasetsPublic
from api.uploads import safe_filename, save_upload, scratch_dir
from core import DatasetError
from service import blob_gc
from service.archives import ArchiveError, Limits, validate_upload
from service.db import for_update as locked
from service.quotas import QuotaExceeded, check_storage
from service.storage import store_then_record
from service.tables import Dataset, new_id

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], route_class=StrictRoute)


def _public(row: Dataset) -> DatasetPublic:
    return DatasetPublic.model_validate(row, from_attributes=True)


def _get(session: SessionDep, tenant_id: str, dataset_id: str, *, for_update: bool = False) -> Dataset:
    query = select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id)
    row = session.scalar(locked(session, query) if for_update else query)
    if row is None:
        raise not_found("dataset", dataset_id)
    return row


def check_storage_quota(
    session: SessionDep, settings: SettingsDep, tenant: TenantDep, size: int, *, lock: bool = False
) -> None:
    """``max_storage_bytes`` per tenant (datasets + models): 409 naming the quota, nothing stored.
    ``lock``: the final check, in the transaction that records the upload (``store_then_record``)."""
    try:
        check_storage(session, settings, tenant, adding=size, lock=lock)
    except QuotaExceeded as exc:
        raise ApiError(409, "quota_exceeded", exc.message) from None


@router.post("", status_code=201, summary="Upload a dataset (.npz, or ImageFolder .zip/.tar/.tar.gz)")
def upload_dataset(
    file: Annotated[UploadFile, File(description="The .npz or archive.")],
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    tenant: TenantDep,
) -> DatasetPublic:
    filename = safe_filename(file.filename, "dataset")
    limits = Limits.from_settings(settings)
    with scratch_dir(settings.resolved_cache_dir / "uploads") as tmp:
        raw = tmp / "upload"
        size = save_upload(file, raw, max_bytes=settings.max_upload_bytes)
        check_storage_quota(session, settings, tenant, size)
        try:
            fmt, path, info = validate_upload(raw, filename, tmp, limits)
        except (ArchiveError, DatasetError) as exc:
            raise ApiError(422, "invalid_dataset", str(exc)) from None
        row = store_then_record(
            session,
            store,
            path if fmt == "npz" else raw,
            check=lambda: check_storage_quota(session, settings, tenant, size, lock=True),
            make_row=lambda sha, _: Dataset(
                id=new_id("ds"),
                tenant_id=tenant.id,
                filename=filename,
                format=fmt,
                sha256=sha,
                size_bytes=size,
                n=int(info["n"]),
                image_shape=[int(v) for v in info["image_shape"]],
                num_classes=int(info["num_classes"]) if info.get("num_classes") is not None else None,
                has_labels=bool(info["has_labels"]),
                normalized=bool(info.get("normalized", False)),
            ),
        )
    response.headers["Location"] = f"/v1/datasets/{row.id}"
    return _public(row)


@router.get("", summary="List your datasets")
def list_datasets(session: SessionDep, tenant: TenantDep) -> DatasetsPublic:
    rows = session.scalars(
        select(Dataset).where(Dataset.tenant_id == tenant.id).order_by(Dataset.id.desc())
    ).all()
    return DatasetsPublic(data=[_public(r) for r in rows])


@router.get("/{dataset_id}", summary="A dataset's facts")
def read_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> DatasetPublic:
    return _public(_get(session, tenant.id, dataset_id))


@router.delete("/{dataset_id}", status_code=204, summary="Delete a dataset not used by an unfinished job")
def delete_dataset(dataset_id: str, session: SessionDep, store: StoreDep, tenant: TenantDep) -> Response:
    """409 while a queued or running job reads it; the blob goes only when no row (any tenant's) names it."""
    # FOR UPDATE before the in-use check: a submit that read the row (FOR SHARE) commits its job first.
    row = _get(session, tenant.id, dataset_id, for_update=True)
    in_use = blob_gc.active_jobs_using(session, tenant_id=tenant.id, dataset_id=row.id)
    if in_use:
        raise ApiError(409, "dataset_in_use", f"dataset {row.id} is used by {in_use} queued or running job(s)")
    blob_gc.delete_upload_and_release(session, store, row)
    return Response(status_code=204)
