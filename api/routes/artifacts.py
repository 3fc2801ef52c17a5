"""``/v1/jobs/{id}/artifacts``: listing and downloads (GET and HEAD; sha256 ETag and Digest, If-None-Match,
Range requests)."""

from __future__ import annotations

import base64
import os
import re
from typing import Annotated, Any

from fastapi import APIRouter, Header, Response
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import select
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from api.deps import SessionDep, StoreDep, TenantDep
from api.errors import ApiError, echo, error_body, not_found
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


def _matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 §13.1.2: ``*`` matches any current representation; otherwise the weak comparison, so
    ``W/"<sha>"`` matches as ``"<sha>"`` does."""
    tags = [t.strip() for t in if_none_match.split(",")]
    return "*" in tags or etag in [t[2:] if t.startswith("W/") else t for t in tags]


_RANGE = re.compile(r"^\s*bytes\s*=\s*((\d+-\d*|-\d+)\s*(,\s*(\d+-\d*|-\d+)\s*)*)$", re.IGNORECASE)


def _satisfiable_parts(spec: str, size: int) -> list[str] | None:
    """The satisfiable ranges of a well-formed ``bytes=`` set, or ``None`` when one of them is invalid
    (``last < first``: the whole header is then ignored, RFC 9110 §14.1.1)."""
    kept = []
    for part in spec.split(","):
        part = part.strip()
        first, _, last = part.partition("-")
        if first == "":
            if int(last) > 0 and size > 0:
                kept.append(part)
        elif last != "" and int(last) < int(first):
            return None
        elif int(first) < size:
            kept.append(part)
    return kept


class DownloadResponse(FileResponse):
    """``FileResponse`` with the ``Range`` header checked first: a malformed one is ignored (the whole
    file, 200, as RFC 9110 §14.2 allows; Starlette answered 400 in text/plain), an unsatisfiable one gets
    416 in the JSON error format with ``Content-Range: bytes */size``."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        value = headers.get("range")
        if value is not None:
            size = os.stat(self.path).st_size
            match = _RANGE.match(value)
            kept = _satisfiable_parts(match.group(1), size) if match else None
            others = [(k, v) for k, v in scope["headers"] if k != b"range"]
            if kept is None:  # malformed: ignored, the whole file
                scope = dict(scope, headers=others)
            elif not kept:
                body = error_body("range_not_satisfiable", f"the range {echo(value)} is outside the {size} bytes")
                answer = JSONResponse(body, status_code=416, headers={"Content-Range": f"bytes */{size}"})
                await answer(scope, receive, send)
                return
            else:  # only the satisfiable ranges (Starlette refuses the whole set for one that is not)
                scope = dict(scope, headers=[*others, (b"range", ("bytes=" + ",".join(kept)).encode())])
        await super().__call__(scope, receive, send)


_DOWNLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}},
    206: {"description": "Partial content"},
    304: {"description": "Not modified (If-None-Match)"},
    416: {"description": "Range not satisfiable"},
}


# Two registrations rather than one api_route(methods=["GET", "HEAD"]): each method then gets its own
# OpenAPI operation id, so generated clients do not see two operations with one name.
@router.get(
    "/{name}",
    summary="Download an artifact",
    response_class=FileResponse,
    responses=_DOWNLOAD_RESPONSES,
)
@router.head(
    "/{name}",
    summary="An artifact's headers (size, ETag, Digest) without its bytes",
    response_class=FileResponse,
    responses=_DOWNLOAD_RESPONSES,
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
    if if_none_match is not None and _matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    try:
        path = store.local_path(artifact.sha256)
    except FileNotFoundError:
        raise ApiError(410, "artifact_gone", f"the bytes of {echo(name)} are no longer in the store") from None
    return DownloadResponse(path, media_type=artifact.content_type, filename=name, headers=headers)
