"""``/v1/datasets``: validated uploads (ImageFolder archive or .npz), listing, deletion."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Response, UploadFile
from sqlalchemy import func, select

from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.errors import ApiError, not_found
from api.schemas import DatasetPublic, DatasetsPublic
from api.uploads import safe_filename, save_upload, scratch_dir
from core import DatasetError
from service.archives import ArchiveError, Limits, validate_upload
from service.tables import FINISHED_STATUSES, Dataset, Job, Model, new_id

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


def _public(row: Dataset) -> DatasetPublic:
    return DatasetPublic.model_validate(row, from_attributes=True)


def _get(session: SessionDep, tenant_id: str, dataset_id: str) -> Dataset:
    row = session.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id))
    if row is None:
        raise not_found("dataset", dataset_id)
    return row


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
    limits = Limits(max_members=settings.max_archive_members, max_bytes=settings.max_archive_bytes)
    with scratch_dir(settings.resolved_cache_dir / "uploads") as tmp:
        raw = tmp / "upload"
        size = save_upload(file, raw, max_bytes=settings.max_upload_bytes)
        try:
            fmt, path, info = validate_upload(raw, filename, tmp, limits)
        except (ArchiveError, DatasetError) as exc:
            raise ApiError(422, "invalid_dataset", str(exc)) from None
        sha, _ = store.put_file(path if fmt == "npz" else raw)
    row = Dataset(
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
    )
    session.add(row)
    session.commit()
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
    row = _get(session, tenant.id, dataset_id)
    in_use = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(
            Job.tenant_id == tenant.id,
            Job.status.not_in(FINISHED_STATUSES),
            (Job.calibration == row.id) | (Job.evaluation == row.id),
        )
    )
    if in_use:
        raise ApiError(409, "dataset_in_use", f"dataset {row.id} is used by {in_use} unfinished job(s)")
    sha = row.sha256
    session.delete(row)
    session.commit()
    others = session.scalar(select(func.count()).select_from(Dataset).where(Dataset.sha256 == sha))
    models = session.scalar(select(func.count()).select_from(Model).where(Model.sha256 == sha))
    if not others and not models:
        store.delete(sha)
    return Response(status_code=204)
