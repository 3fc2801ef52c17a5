"""Bounds on request bodies: size (413) and arrival time (408), enforced while the body streams in.

Why a middleware: the declared ``Content-Length`` can be absent (chunked uploads) or honest but the
client may trickle bytes for hours, holding a connection and a scratch file. Counting bytes and
timing each read as they arrive refuses both before the app spools them, whatever the route does.
"""

from __future__ import annotations

import asyncio
import json
import time

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
