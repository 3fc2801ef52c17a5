"""The FastAPI application: ``create_app(settings)`` mounts every router in one place."""

from __future__ import annotations

from fastapi import FastAPI

from api.errors import UnhandledErrors, add_server_roots, install_error_handlers
from api.metrics import LatencyMiddleware, make_registry
from api.request_body import RequestBodyGuard
from api.routes import artifacts, datasets, health, jobs, models, results
from api.uploads import sweep_orphaned_scratch
from service.offline import go_offline
from service.settings import Settings, get_settings

DESCRIPTION = """Quantization-as-a-service for Vision Transformers (I&S-ViT post-training quantization).

Authenticate with `Authorization: Bearer <key>` (`vitq keys create --tenant NAME`).
Errors are JSON `{"error": {"code", "message"}}`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    go_offline()
    add_server_roots(settings.data_dir.resolve(), settings.resolved_storage_dir, settings.resolved_cache_dir)
    sweep_orphaned_scratch(settings.resolved_cache_dir / "uploads")  # a previous process was killed
    app = FastAPI(title="vitq", version="0.1.0", description=DESCRIPTION)
    app.state.settings = settings
    registry, latency = make_registry(settings.resolved_database_url)
    app.state.registry = registry
    install_error_handlers(app)
    for module in (health, jobs, artifacts, datasets, models, results):
        app.include_router(module.router)
    app.add_middleware(UnhandledErrors)  # innermost: one 500 in the error format, one traceback
    # Multipart framing adds a little to the file itself.
    app.add_middleware(
        RequestBodyGuard,
        max_bytes=settings.max_upload_bytes + 1024 * 1024,
        idle_timeout_s=settings.body_idle_timeout_s,
        total_timeout_s=settings.body_timeout_s,
    )
    app.add_middleware(LatencyMiddleware, histogram=latency)
    return app
