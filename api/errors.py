"""Errors as JSON ``{"error": {"code", "message"}}``, mapped to HTTP status in one place."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import VitqError
from service.storage import StorageError

log = logging.getLogger("vitq.api")
RETRY_AFTER_S = "5"

DATABASE_UNREACHABLE = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,
)
"""Errors that mean the database cannot be reached right now (restart, failover, pool exhausted): the
request was fine, so the answer is 503 + Retry-After, never a 500."""


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} {ident!r} not found")


def error_body(code: str, message: str, details: object | None = None) -> dict:
    error: dict[str, object] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return {"error": error}


def _format_validation(exc: RequestValidationError) -> tuple[str, list[dict]]:
    details = []
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
        msg = str(err.get("msg", "invalid"))
        details.append({"field": loc, "message": msg})
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts) or "invalid request", details


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(VitqError)
    async def _core_error(_: Request, exc: VitqError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message), status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, details = _format_validation(exc)
        return JSONResponse(error_body("invalid_request", message, details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(
            exc.status_code, "http_error"
        )
        return JSONResponse(
            error_body(code, str(exc.detail)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    async def _database_unreachable(_: Request, exc: Exception) -> JSONResponse:
        log.warning("database unreachable: %s", type(exc).__name__)
        return JSONResponse(
            error_body("database_unavailable", "the database is unreachable; try again shortly"),
            status_code=503,
            headers={"Retry-After": RETRY_AFTER_S},
        )

    for exc_type in DATABASE_UNREACHABLE:
        app.add_exception_handler(exc_type, _database_unreachable)

    @app.exception_handler(StorageError)
    async def _storage_error(_: Request, exc: StorageError) -> JSONResponse:
        log.error("artifact store: %s", exc)
        if exc.disk_full:
            body = error_body("insufficient_storage", "the server has no space left for this upload")
            return JSONResponse(body, status_code=507, headers={"Retry-After": "60"})
        body = error_body("storage_unavailable", "the artifact store cannot be written; try again later")
        return JSONResponse(body, status_code=503, headers={"Retry-After": "60"})

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)
