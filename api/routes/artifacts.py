"""``/v1/jobs/{id}/artifacts``: listing and downloads (sha256 ETag and Digest, Range requests)."""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, Header, Response
from fastapi.responses import FileResponse
from sqlalchemy import select

from api.deps import SessionDep, StoreDep, TenantDep
from api.errors import ApiError, not_found
from api.jobs_view import get_job
from api.schemas import ArtifactPublic, ArtifactsPublic
from service.tables import Artifact

router = APIRouter(prefix="/v1/jobs/{job_id}/artifacts", tags=["artifacts"])


@router.get("", summary="List a job's artifacts")
def list_artifacts(job_id: str, session: SessionDep, tenant: TenantDep) -> ArtifactsPublic:
    job = get_job(session, tenant_id=tenant.id, job_id=job_id)
    rows = session.scalars(select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.name)).all()
    return ArtifactsPublic(
        data=[
            ArtifactPublic(
                name=a.name,
                sha256=a.sha256,
                size_bytes=a.size_bytes,
                content_type=a.content_type,
                url=f"/v1/jobs/{job.id}/artifacts/{a.name}",
            )
            for a in rows
        ]
    )


@router.get(
    "/{name}",
    summary="Download an artifact",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "Partial content"}},
)
def download_artifact(
    job_id: str,
    name: str,
    session: SessionDep,
    store: StoreDep,
    tenant: TenantDep,
    if_none_match: Annotated[str | None, Header(max_length=200)] = None,
) -> Response:
    job = get_job(session, tenant_id=tenant.id, job_id=job_id)
    artifact = session.scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.name == name))
    if artifact is None:
        raise not_found("artifact", name)
    etag = f'"{artifact.sha256}"'
    digest = "sha-256=" + base64.b64encode(bytes.fromhex(artifact.sha256)).decode()
    headers = {"ETag": etag, "Digest": digest, "Cache-Control": "private, max-age=0"}
    if if_none_match is not None and etag in [t.strip() for t in if_none_match.split(",")]:
        return Response(status_code=304, headers=headers)
    try:
        path = store.local_path(artifact.sha256)
    except FileNotFoundError:
        raise ApiError(410, "artifact_gone", f"the bytes of {name!r} are no longer in the store") from None
    return FileResponse(path, media_type=artifact.content_type, filename=name, headers=headers)
