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
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import authenticate_early, get_tenant
from api.errors import echo, error_body


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


def _too_large(
    limit: int, length: int | None, code: str = "upload_too_large", what: str = "request body"
) -> BodyRejected:
    size = f"{what} of {length} bytes" if length is not None else what
    return BodyRejected(413, code, f"{size} exceeds the limit of {limit} bytes")


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


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's members, refusing a name that appears twice: RFC 8259 leaves the meaning open, Python
    keeps the last and other parsers the first, so ``{"w_bits": 8, "w_bits": 2}`` would mean different
    jobs to the client, a proxy and us."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {echo(key)} in an object")
            seen.add(key)
    return obj


def loads_strict(body: bytes | str) -> Any:
    """``json.loads`` that refuses ``NaN``, ``Infinity`` and ``-Infinity`` (Python's parser accepts them;
    RFC 8259 does not, and a NaN learning rate or kwarg only fails later, somewhere else), duplicate keys
    in an object, and nesting deeper than the parser's recursion allows (a ``JSONDecodeError`` each)."""
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text[:0], 0) from None
    except ValueError as exc:
        raise json.JSONDecodeError(str(exc), text[:0], 0) from None


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


def _needs_tenant(dependant: Dependant) -> bool:
    return any(d.call is get_tenant or _needs_tenant(d) for d in dependant.dependencies)


class StrictRoute(APIRoute):
    """Route class of every router with a body. Before a byte of the body is read: the API key is checked
    (401/429 from the headers alone), then the ``Content-Type`` (415: a JSON route takes JSON, an upload
    route a form), then a JSON body's size (413 past ``max_json_body_bytes``, from ``Content-Length`` or
    while it streams; uploads keep ``max_upload_bytes``). A JSON body is parsed with :func:`loads_strict`;
    a form field sent twice is a 400 (two ``file`` parts: which one would be checked?). Bodies that are
    not JSON at all get 400 from the validation handler (``api/errors.py``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        kind = None
        if self.body_field is not None:
            kind = "form" if isinstance(self.body_field.field_info, params.Form) else "json"
        accepted = FORM_TYPES if kind == "form" else JSON_TYPES
        needs_tenant = _needs_tenant(self.dependant)

        async def strict_handler(request: Request) -> Response:
            if needs_tenant:
                await authenticate_early(request)
            receive = request.receive
            if kind is not None and _has_body(request):
                content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
                if not (content_type in accepted or (kind == "json" and content_type.endswith("+json"))):
                    raise BodyRejected(
                        415,
                        "unsupported_media_type",
                        f"Content-Type {content_type[:80] or '(none)'!r} is not accepted here; "
                        f"send {' or '.join(accepted)}",
                    )
                if kind == "json":
                    receive = _limited(request, request.app.state.settings.max_json_body_bytes)
            return await handler(StrictRequest(request.scope, receive, request._send))

        return strict_handler


def _limited(request: Request, limit: int) -> Receive:
    """``request.receive`` that refuses (413) a body over ``limit`` bytes: at once from its declared
    ``Content-Length``, else as soon as the bytes that arrived pass it (chunked)."""
    declared = _declared_length(request.scope)
    if declared is not None and declared > limit:
        raise _too_large(limit, declared, "body_too_large", "JSON body")
    received = 0
    receive = request.receive

    async def limited_receive() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _too_large(limit, None, "body_too_large", "JSON body")
        return message

    return limited_receive
