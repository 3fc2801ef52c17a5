"""A minimal HTTP/1.1 keep-alive client for the load generator (asyncio streams, one connection per
simulated client).

Why not httpx: on a 2-core machine the generator shares the CPU with the service it measures, and
httpx spends about 1 ms of CPU per request, which showed up as latency of the service. This client
does only what the benchmark needs: JSON bodies, ``Content-Length`` framing, keep-alive, reconnect.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


class LoadHttpError(Exception):
    """The connection failed or the server's answer could not be read."""


@dataclass
class Reply:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Connection:
    def __init__(self, url: str, headers: dict[str, str], timeout: float) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.timeout = timeout
        base = {"Host": f"{self.host}:{self.port}", "Connection": "keep-alive", **headers}
        self._headers = "".join(f"{k}: {v}\r\n" for k, v in base.items())
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Reply:
        payload = b"" if body is None else json.dumps(body).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        if body is not None:
            extra += "Content-Type: application/json\r\n"
        head = f"{method} {path} HTTP/1.1\r\n{self._headers}{extra}Content-Length: {len(payload)}\r\n\r\n"
        for attempt in (0, 1):  # one silent reconnect: the server may have closed an idle connection
            try:
                return await asyncio.wait_for(self._exchange(head.encode() + payload), self.timeout)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                await self.close()
                if attempt:
                    raise LoadHttpError(f"{type(exc).__name__}: {exc}") from None
            except TimeoutError:
                await self.close()
                raise LoadHttpError("timed out") from None
        raise AssertionError("unreachable")

    async def _exchange(self, data: bytes) -> Reply:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self._writer.write(data)
        return await self._read_reply()

    async def _read_reply(self) -> Reply:
        assert self._reader is not None
        head = await self._reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, close = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
            elif name == "transfer-encoding":
                raise LoadHttpError("chunked responses are not supported by the load client")
        body = await self._reader.readexactly(length) if length else b""
        if close:
            await self.close()
        return Reply(status, body)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (ConnectionError, OSError):
                pass
        self._reader = self._writer = None
