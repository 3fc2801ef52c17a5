"""Errors as JSON ``{"error": {"code", "message"}}``, mapped to HTTP status in one place."""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import tempfile
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


ECHO_LIMIT = 64
"""Longest piece of client input (an id, a cursor) echoed back in a message."""


def echo(value: object, limit: int = ECHO_LIMIT) -> str:
    """``repr`` of client input for a message, cut to ``limit`` characters (a 10 kB id is not echoed)."""
    text = str(value)
    return repr(text if len(text) <= limit else text[:limit] + "…")


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} {echo(ident)} not found")


_SERVER_ROOTS: list[str] = []


def add_server_roots(*paths: Path | str) -> None:
    """Directories whose paths never appear in a message (the app adds its data, store and cache dirs)."""
    for path in paths:
        text = str(path).rstrip("/")
        if text and text not in _SERVER_ROOTS:
            _SERVER_ROOTS.append(text)
    _SERVER_ROOTS.sort(key=len, reverse=True)


add_server_roots(tempfile.gettempdir(), sys.prefix, sys.base_prefix, Path(__file__).resolve().parents[1],
                 Path.home(), os.getcwd())


def public_message(message: str) -> str:
    """The last line of defence for "no server path, host name or pid in a message": a path under a
    server directory is cut to its last component, and the host name is replaced. Messages name uploads
    by their client filename in the first place (``inspect_dataset(name=…)``); this catches the rest
    (a PIL or OS error quoting a scratch path)."""
    for root in _SERVER_ROOTS:
        if root in message:
            message = re.sub(re.escape(root) + r"(?:/[^\s'\":,;)]*)?",
                             lambda m: m.group(0).rsplit("/", 1)[-1] or "…", message)
    host = socket.gethostname()
    if len(host) >= 4 and host in message:
        message = message.replace(host, "<server>")
    return _encodable(message)


def _encodable(text: str) -> str:
    """Text that encodes as UTF-8: a tar member named in latin-1 reaches a message as a lone surrogate
    (``surrogateescape``), and rendering the JSON body then raised (found by the upload fuzzer: a 500)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:
            return text.encode("utf-8", "replace").decode("utf-8")


def error_body(code: str, message: str, details: object | None = None) -> dict:
    error: dict[str, object] = {"code": code, "message": public_message(_cut(message, MESSAGE_LIMIT))}
    if details is not None:
        error["details"] = details
    return {"error": error}


MAX_LISTED_ERRORS = 10
"""Validation errors listed in one 422 (message and ``details``); the rest are counted. A body with
thousands of unknown keys under ``options`` got a 422 ten times its size, built in seconds (issue 19)."""
FIELD_MESSAGE_LIMIT = 300
"""Longest message of one listed field: a validator's message may quote the input."""
MESSAGE_LIMIT = 2000
"""Longest error message at all: the last cut of every echo, whatever a check quoted."""


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _format_validation(exc: RequestValidationError) -> tuple[str, list[dict]]:
    errors = exc.errors()
    details = []
    parts = []
    for err in errors[:MAX_LISTED_ERRORS]:
        loc = ".".join(_cut(str(p), ECHO_LIMIT) for p in err.get("loc", ()) if p != "body") or "request"
        msg = _cut(str(err.get("msg", "invalid")), FIELD_MESSAGE_LIMIT)
        details.append({"field": loc, "message": msg})
        parts.append(f"{loc}: {msg}")
    if len(errors) > MAX_LISTED_ERRORS:
        parts.append(f"and {len(errors) - MAX_LISTED_ERRORS} more error(s)")
    return "; ".join(parts) or "invalid request", details


def _body_unreadable(exc: RequestValidationError) -> str | None:
    """A 400 message when the body could not be read as JSON at all (rather than a field being wrong)."""
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            reason = (err.get("ctx") or {}).get("error") or "JSON decode error"
            return f"body is not valid JSON: {reason}"
        if err.get("type") == "missing" and tuple(err.get("loc", ())) == ("body",):
            return "the request body is empty: send a JSON object"
    return None


class UnhandledErrors:
    """Innermost middleware: an exception no handler took becomes one 500 in the error format, logged
    once here. (Starlette's outermost error middleware re-raises after answering, so the server logged
    the same traceback a second time.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:  # the response is half sent: nothing better to do than end it
                return
            response = JSONResponse(error_body("internal_error", "internal server error"), status_code=500)
            await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(VitqError)
    async def _core_error(_: Request, exc: VitqError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message), status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        unreadable = _body_unreadable(exc)
        if unreadable is not None:
            return JSONResponse(error_body("invalid_json", unreadable), status_code=400)
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

    @app.exception_handler(sa_exc.DataError)
    async def _value_out_of_range(_: Request, exc: sa_exc.DataError) -> JSONResponse:
        # A value the checks let through but the column cannot hold: a gap in validation (logged), never
        # a 500. An upload's blob is removed by ``store_then_record`` before this answer.
        log.warning("database refused a value: %s", str(exc.orig)[:300])
        body = error_body("value_out_of_range", "a value in the request is out of the range the service stores")
        return JSONResponse(body, status_code=422)

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
