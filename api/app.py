"""The FastAPI application: ``create_app(settings)`` mounts every router in one place."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_body, install_error_handlers
from api.metrics import LatencyMiddleware, make_registry
from api.persistence.settings import Settings, get_settings
from api.routes import artifacts, datasets, health, jobs, models, results
from api.uploads import sweep_orphaned_scratch

DESCRIPTION = """Quantization-as-a-service for Vision Transformers (I&S-ViT post-training quantization).

Authenticate with `Authorization: Bearer <key>` (`vitq keys create --tenant NAME`).
Errors are JSON `{"error": {"code", "message"}}`.
"""


class BodySizeLimit:
    """Refuses requests whose declared Content-Length is over the upload limit, before reading them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope.get("headers", []):
                if name == b"content-length":
                    try:
                        length = int(value)
                    except ValueError:
                        length = -1
                    if length < 0 or length > self.max_bytes:
                        await _send_json(send, 413 if length > 0 else 400, length, self.max_bytes)
                        return
        await self.app(scope, receive, send)


async def _send_json(send: Send, status: int, length: int, limit: int) -> None:
    import json

    if status == 413:
        body = error_body(
            "upload_too_large", f"request body of {length} bytes exceeds the limit of {limit} bytes"
        )
    else:
        body = error_body("invalid_request", "invalid Content-Length header")
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    sweep_orphaned_scratch(settings.resolved_cache_dir / "uploads")  # a previous process was killed
    app = FastAPI(title="vitq", version="0.1.0", description=DESCRIPTION)
    app.state.settings = settings
    registry, latency = make_registry(settings.resolved_database_url)
    app.state.registry = registry
    install_error_handlers(app)
    for module in (health, jobs, artifacts, datasets, models, results):
        app.include_router(module.router)
    # Multipart framing adds a little to the file itself.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes + 1024 * 1024)
    app.add_middleware(LatencyMiddleware, histogram=latency)
    return app
