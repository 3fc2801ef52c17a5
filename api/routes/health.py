"""Liveness, readiness (database and broker reachable), Prometheus metrics, the caller's tenant."""

from __future__ import annotations

import os

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from kombu import Connection
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import SettingsDep, TenantDep
from api.schemas import TenantPublic
from service.db import ping
from service.settings import Settings

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check_broker(settings: Settings) -> None:
    if settings.is_filesystem_broker:
        folder = settings.broker_folder
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise RuntimeError(f"broker folder {folder} is not writable")
        return
    with Connection(settings.resolved_broker_url, connect_timeout=2) as conn:
        conn.ensure_connection(max_retries=1, timeout=3)


@router.get(
    "/readyz",
    summary="Readiness: database and broker reachable",
    responses={503: {"description": "A dependency is unreachable"}},
)
def readyz(settings: SettingsDep) -> JSONResponse:
    checks: dict[str, str] = {}
    for name, check in (
        ("database", lambda: ping(settings.resolved_database_url)),
        ("broker", lambda: _check_broker(settings)),
    ):
        try:
            check()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unreachable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/tenant", summary="Your tenant and its webhook signing secret")
def read_tenant(tenant: TenantDep) -> TenantPublic:
    return TenantPublic(id=tenant.id, name=tenant.name, webhook_secret=tenant.webhook_secret)
