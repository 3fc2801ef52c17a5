"""Bounds on request bodies: size (413) and arrival time (408), enforced while the body streams in.

Why a middleware: the declared ``Content-Length`` can be absent (chunked uploads) or honest but the
client may trickle bytes for hours, holding a connection and a scratch file. Counting bytes and
timing each read as they arrive refuses both before the app spools them, whatever the route does.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response, params
from fastapi.routing import APIRoute
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body


class BodyRejected(HTTPException):
    """Raised from ``receive``; an ``HTTPException`` so FastAPI's body parsing lets it through to the
    JSON error handler instead of turning it into a generic 400."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status_code=status, detail=message)
        self.code = code


class RequestBodyGuard:
    def __init__(
        self, app: ASGIApp, *, max_bytes: int, idle_timeout_s: float, total_timeout_s: float
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.idle_timeout_s = idle_timeout_s
        self.total_timeout_s = total_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and (declared < 0 or declared > self.max_bytes):
            if declared < 0:
                rejected = BodyRejected(400, "invalid_request", "invalid Content-Length header")
            else:
                rejected = _too_large(self.max_bytes, declared)
            await _send_error(send, rejected)
            return
        started = time.monotonic()
        state = {"received": 0, "done": False}

        async def guarded_receive() -> Message:
            if state["done"]:  # after the body: waiting for a disconnect must not time out
                return await receive()
            left = self.total_timeout_s - (time.monotonic() - started)
            try:
                message = await asyncio.wait_for(receive(), max(0.0, min(self.idle_timeout_s, left)))
            except TimeoutError:
                raise BodyRejected(
                    408,
                    "request_timeout",
                    f"the request body did not arrive in time (no data for {self.idle_timeout_s:g} s, "
                    f"or more than {self.total_timeout_s:g} s in all)",
                ) from None
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    raise _too_large(self.max_bytes, None)
                state["done"] = not message.get("more_body", False)
            else:
                state["done"] = True
            return message

        try:
            await self.app(scope, guarded_receive, send)
        except BodyRejected as exc:  # raised outside FastAPI's handlers (e.g. before routing)
            await _send_error(send, exc)


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return None


def _too_large(limit: int, length: int | None) -> BodyRejected:
    size = f"request body of {length} bytes" if length is not None else "request body"
    return BodyRejected(413, "upload_too_large", f"{size} exceeds the limit of {limit} bytes")


async def _send_error(send: Send, exc: BodyRejected) -> None:
    payload = json.dumps(error_body(exc.code, str(exc.detail))).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if exc.status_code == 408:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


# -- what a body must be: JSON routes take JSON (no NaN), upload routes one value per form field ------

JSON_TYPES = ("application/json",)
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (use a number or null)")


def loads_strict(body: bytes | str) -> Any:
    """``json.loads`` that refuses ``NaN``, ``Infinity`` and ``-Infinity`` (Python's parser accepts them;
    RFC 8259 does not, and a NaN learning rate or kwarg only fails later, somewhere else)."""
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError:
        raise
    except ValueError as exc:
        raise json.JSONDecodeError(str(exc), text, 0) from None


class StrictRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = loads_strict(body)
            except UnicodeDecodeError:
                raise json.JSONDecodeError("the body is not UTF-8", "", 0) from None
        return self._json

    async def _get_form(self, **kwargs: Any) -> FormData:
        form = await super()._get_form(**kwargs)
        repeated = sorted({key for key in form.keys() if len(form.getlist(key)) > 1})
        if repeated:
            await form.close()
            raise BodyRejected(
                400, "duplicate_field", f"form field(s) {', '.join(map(repr, repeated[:5]))} sent more than once"
            )
        return form


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    return "transfer-encoding" in request.headers or (length is not None and length.strip() not in ("", "0"))


class StrictRoute(APIRoute):
    """Route class of every router with a body: a JSON route answers 415 to a body of another
    ``Content-Type`` and parses with :func:`loads_strict`; an upload route answers 415 to a body that
    is not a form, and 400 to a form field sent twice (two ``file`` parts: which one would be checked?).
    Bodies that are not JSON at all get 400 from the validation handler (``api/errors.py``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        kind = None
        if self.body_field is not None:
            kind = "form" if isinstance(self.body_field.field_info, params.Form) else "json"
        accepted = FORM_TYPES if kind == "form" else JSON_TYPES

        async def strict_handler(request: Request) -> Response:
            request = StrictRequest(request.scope, request.receive, request._send)
            if kind is not None and _has_body(request):
                content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
                if not (content_type in accepted or (kind == "json" and content_type.endswith("+json"))):
                    raise BodyRejected(
                        415,
                        "unsupported_media_type",
                        f"Content-Type {content_type[:80] or '(none)'!r} is not accepted here; "
                        f"send {' or '.join(accepted)}",
                    )
            return await handler(request)

        return strict_handler
