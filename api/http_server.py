"""The HTTP server of ``vitq api`` and ``vitq serve`` (and so of docker compose): uvicorn with bounds on
clients that are slow or silent before their request is in, or stop reading their response.

Why: uvicorn bounds an idle keep-alive connection (``timeout_keep_alive``) but not one that opens and
never sends a byte, nor one that trickles its request head a byte at a time, nor (with httptools) the
size of that head; each such connection is held for ever (issue 19: slow headers). The request *body*
is bounded by ``api.request_body.RequestBodyGuard`` (408/413), which needs a complete head to run.

:class:`BoundedHttpToolsProtocol` adds, per connection:

- a **head deadline**: from the moment a connection opens, and again after each response, the next
  request line and headers must be complete within ``header_timeout_s``; otherwise the connection is
  closed, with a 408 when part of a head had arrived (silently when nothing had: an idle connection);
- a **head size** bound: more than ``max_head_bytes`` of request line and headers is a 431;
- a **write-stall deadline**: a response the client has not read a byte of for ``write_stall_timeout_s``
  (the transport's buffer stays full) ends the connection, so a reader that stops holds no connection.

:class:`ServerConfig` carries these and uvicorn's own bounds (``limit_concurrency``,
``timeout_keep_alive``, ``h11_max_incomplete_event_size``) from the settings; :func:`serve` runs it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.errors import error_body
from service.settings import Settings


class _HeadTooLarge(Exception):
    """Raised from a parser callback; httptools turns it into an ``HttpParserCallbackError``."""


class ServerConfig(uvicorn.Config):
    """``uvicorn.Config`` with the service's connection bounds from ``settings`` (a plain object, so it
    reaches the processes of ``--workers`` N as uvicorn pickles it)."""

    def __init__(self, app: Any, *, settings: Settings, **kwargs: Any) -> None:
        super().__init__(
            app,
            http=BoundedHttpToolsProtocol,
            timeout_keep_alive=settings.http_keep_alive_s,
            limit_concurrency=settings.http_max_connections,
            h11_max_incomplete_event_size=settings.http_max_head_bytes,
            **kwargs,
        )
        self.header_timeout_s = settings.http_header_timeout_s
        self.max_head_bytes = settings.http_max_head_bytes
        self.write_stall_timeout_s = settings.http_write_stall_timeout_s


def serve(app: Any, settings: Settings, **kwargs: Any) -> None:
    """``uvicorn.run`` with :class:`ServerConfig`: ``app`` is the app, or an import string of its factory
    (``factory=True``) when ``workers`` > 1."""
    config = ServerConfig(app, settings=settings, **kwargs)
    server = uvicorn.Server(config)
    if config.workers > 1:
        from uvicorn.supervisors import Multiprocess

        Multiprocess(config, sockets=[config.bind_socket()]).run()
    else:
        server.run()


def _response(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps(error_body(code, message)).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head deadline, a head size bound and a write-stall deadline
    (see the module docstring). Reads its bounds from a :class:`ServerConfig`; with a plain
    ``uvicorn.Config`` it uses the settings' defaults."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        defaults = Settings.model_fields
        self.header_timeout_s: float = getattr(config, "header_timeout_s", defaults["http_header_timeout_s"].default)
        self.max_head_bytes: int = getattr(config, "max_head_bytes", defaults["http_max_head_bytes"].default)
        self.write_stall_timeout_s: float = getattr(
            config, "write_stall_timeout_s", defaults["http_write_stall_timeout_s"].default
        )
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = False  # a byte of the awaited head has arrived
        self._head_bytes = 0
        self._head_too_large = False
        self._stall_timer: asyncio.TimerHandle | None = None

    # -- the head deadline ------------------------------------------------------------------------

    def _await_head(self) -> None:
        self._cancel_head_timer()
        self._head_started = False
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_started:
            self.transport.write(
                _response(
                    408,
                    "Request Timeout",
                    "request_timeout",
                    f"the request line and headers did not arrive within {self.header_timeout_s:g} s",
                )
            )
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_stall_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is not None and data:
            self._head_started = True
        super().data_received(data)

    def on_message_begin(self) -> None:
        self._head_bytes = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_head_bytes:
            self._head_too_large = True
            raise _HeadTooLarge

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error; a head past ``max_head_bytes`` gets 431 instead."""
        if not self._head_too_large:
            super().send_400_response(msg)
            return
        self._cancel_head_timer()
        self.transport.write(
            _response(
                431,
                "Request Header Fields Too Large",
                "headers_too_large",
                f"the request line and headers exceed {self.max_head_bytes} bytes",
            )
        )
        self.transport.close()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        if not pipelined and not self.transport.is_closing():
            self._await_head()

    # -- the write-stall deadline -----------------------------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        self._cancel_stall_timer()
        self._stall_timer = self.loop.call_later(self.write_stall_timeout_s, self._write_stalled)

    def resume_writing(self) -> None:
        self._cancel_stall_timer()
        super().resume_writing()

    def _cancel_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _write_stalled(self) -> None:
        self._stall_timer = None
        self.logger.info("closing a connection whose client read nothing for %g s", self.write_stall_timeout_s)
        self.transport.abort()
