"""All service settings, from ``VITQ_*`` environment variables (pydantic-settings).

Built on demand through ``get_settings()`` (cached) rather than at import time, because Celery
forks workers and tests change the environment between apps.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from core.hub_weights import HubPolicy


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VITQ_", extra="ignore")

    data_dir: Path = Field(Path(".vitq"), description="Everything the embedded default keeps lives here.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL. Default: SQLite file `<data_dir>/vitq.db`."
    )
    broker_url: str | None = Field(
        None, description="Celery broker URL. Default: kombu filesystem transport under `<data_dir>/broker`."
    )
    storage_dir: Path | None = Field(None, description="Artifact store root. Default: `<data_dir>/store`.")
    cache_dir: Path | None = Field(
        None, description="Worker scratch space (extracted datasets). Default: `<data_dir>/cache`."
    )
    queue: str = Field("vitq", description="Celery queue the API sends jobs to and workers consume.")
    db_pool_size: int = Field(10, description="Pooled database connections per process (PostgreSQL).")
    db_max_overflow: int = Field(10, description="Extra connections a process may open under bursts.")
    db_connect_timeout_s: int = Field(
        5, ge=1, description="Give up opening a PostgreSQL connection after this long (the request gets 503)."
    )

    max_upload_bytes: int = Field(512 * 1024**2, description="Largest accepted upload (bytes).")
    body_idle_timeout_s: float = Field(30.0, description="A request body pausing this long is refused (408).")
    body_timeout_s: float = Field(900.0, description="A request body must arrive within this many seconds.")
    max_json_body_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description="Largest JSON request body (a job is a few kB); uploads have `max_upload_bytes`. Larger: 413.",
    )
    max_image_pixels: int | None = Field(
        None,
        ge=1,
        description="Most pixels (width × height, read from the header before decoding) one image of an "
        "uploaded ImageFolder archive may have; larger: 422 naming the file. Default: "
        "`core.pixel_budget.MAX_IMAGE_PIXELS` (4096²).",
    )
    max_dataset_pixels: int | None = Field(
        None,
        ge=1,
        description="Most pixels all the images of one uploaded archive may have together. Default: "
        "`core.pixel_budget.MAX_DATASET_PIXELS` (2³¹).",
    )
    http_header_timeout_s: float = Field(
        10.0, gt=0, description="A connection whose request head (request line + headers) is not complete this "
        "long after it opened (or after its previous response) is closed (408 when part of a head arrived)."
    )
    http_max_head_bytes: int = Field(
        16 * 1024, ge=1024, description="Largest request head (request line + headers). Larger: 431."
    )
    http_keep_alive_s: float = Field(5.0, gt=0, description="An idle keep-alive connection is closed after this long.")
    http_write_stall_timeout_s: float = Field(
        60.0, gt=0, description="A client that reads nothing of its response for this long is disconnected."
    )
    http_max_connections: int = Field(
        1000,
        ge=1,
        description="Connections (and requests in progress) one API process serves at once; past it, requests get "
        "503. Keep it under the process's file-descriptor limit.",
    )
    max_archive_members: int = Field(200_000, description="Most members an uploaded archive may hold.")
    max_archive_bytes: int = Field(4 * 1024**3, description="Largest uncompressed archive (bytes).")
    max_model_parameters: int = Field(
        400_000_000,
        ge=1,
        description="Most parameters a job's or an upload's model may have, counted on the meta device before "
        "anything is built (ViT-L/16 has 304 M; the I&S-ViT paper's largest model, Swin-B, 88 M).",
    )

    hub_access: Literal["off", "cache-only", "online"] = Field(
        "off",
        description="Pretrained weights for timm and Hugging Face Hub ids: `off` (refused at submit), "
        "`cache-only` (what `model_cache` holds), `online` (workers download into `model_cache` from "
        "`HF_ENDPOINT`, the public Hub or an internal mirror, with the operator's `HF_TOKEN`). The API never "
        "downloads weights.",
    )
    model_cache: Path | None = Field(
        None,
        description="The weights cache every worker reads (Hugging Face cache layout: a shared volume or one "
        "per host). Default: `<data_dir>/models`.",
    )
    hub_allowed_orgs: str = Field(
        "",
        description="Comma list of Hub organisations whose repositories jobs may name (`timm,my-company`); "
        "empty: any. Others are refused at submit.",
    )
    hub_timeout_s: float = Field(
        10.0, gt=0, description="A Hub or mirror request that gets no answer this long fails the fetch (no retries)."
    )

    job_soft_time_limit_s: int = Field(6 * 3600, description="Soft time limit of one job (seconds).")
    job_time_limit_s: int = Field(6 * 3600 + 300, description="Hard time limit of one job (seconds).")
    heartbeat_interval_s: float = Field(2.0, description="How often a running job's heartbeat is written.")
    stale_after_s: float = Field(60.0, description="A running job without heartbeat this long is re-queued.")
    reaper_interval_s: float = Field(30.0, description="How often a worker looks for stale jobs.")
    max_attempts: int = Field(3, description="Attempts before a job whose worker died is failed.")
    lost_message_after_s: float = Field(
        60.0, description="A queued job the broker holds no message for this long is sent again."
    )
    progress_interval_s: float = Field(1.0, description="Minimum seconds between progress writes.")
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="PyTorch threads per running job. Default: the CPUs the worker may use (affinity and "
        "cgroup quota) divided by its --concurrency. Set it to cores / N when N worker processes share a host.",
    )

    webhook_max_retries: int = Field(5, description="Webhook delivery retries (exponential backoff).")
    webhook_timeout_s: float = Field(10.0, description="Timeout of one webhook POST.")
    webhook_backoff_max_s: int = Field(600, description="Longest wait between webhook retries.")
    webhook_queue: str | None = Field(
        None,
        description="Queue the webhook deliveries go to (`vitq webhooks` consumes it), never the job queue. "
        "Default: `<queue>-webhooks`.",
    )
    webhook_concurrency: int = Field(8, ge=1, description="Deliveries one `vitq webhooks` process runs at once.")
    webhook_allow_private: bool = Field(
        False,
        description="Allow webhook targets on loopback, private, link-local, multicast, unspecified or "
        "unique-local addresses (off: such a URL is refused at submit and at delivery).",
    )
    webhook_ports: str = Field(
        "80,443,8080,8443",
        description="Ports a webhook URL may use: a comma list of ports and ranges (`8000-8999`), or `*`.",
    )

    rate_limit_rps: float = Field(
        100.0, ge=0, description="Requests per second per API key (0: no limit); a tenant's own value wins."
    )
    rate_limit_burst: int = Field(
        200, ge=1, description="Requests a key may send at once above the steady rate; a tenant's own value wins."
    )
    rate_limit_redis_url: str | None = Field(
        None,
        description="Redis holding the rate-limit counters, shared by every API process. Default: the broker "
        "when it is Redis; otherwise (embedded default) the counters live in the one API process.",
    )
    max_active_jobs: int = Field(
        100, ge=0, description="Queued + running jobs a tenant may have (0: no limit); a tenant's own value wins."
    )
    max_storage_bytes: int = Field(
        10 * 1024**3,
        ge=0,
        description="Bytes of uploads (datasets + models) a tenant may keep (0: no limit); a tenant's own value wins.",
    )
    retention_days: float | None = Field(
        None,
        gt=0,
        description="Finished jobs' artifacts older than this are removed (the row stays, with "
        "`artifacts_expired: true`). Default: kept for ever.",
    )
    retention_interval_s: float = Field(3600.0, gt=0, description="How often a worker runs the retention pass.")
    orphan_blob_grace_s: float = Field(
        3600.0, ge=0, description="A blob no row references is removed by the retention pass after this long."
    )

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'vitq.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def resolved_storage_dir(self) -> Path:
        return (self.storage_dir or self.data_dir / "store").resolve()

    @property
    def resolved_cache_dir(self) -> Path:
        return (self.cache_dir or self.data_dir / "cache").resolve()

    @property
    def resolved_model_cache(self) -> Path:
        return (self.model_cache or self.data_dir / "models").resolve()

    def hub_policy(self) -> HubPolicy:
        """The hub rules of this deployment (``core.hub_weights``); the token is the operator's ``HF_TOKEN``
        from the worker's environment, never a request's. Imported here: settings stay free of torch."""
        from core.hub_weights import HubAccess, HubPolicy, parse_orgs

        return HubPolicy(HubAccess(self.hub_access), self.resolved_model_cache, parse_orgs(self.hub_allowed_orgs),
                         os.environ.get("HF_ENDPOINT") or None, os.environ.get("HF_TOKEN") or None,
                         self.hub_timeout_s)

    @property
    def resolved_webhook_queue(self) -> str:
        return self.webhook_queue or f"{self.queue}-webhooks"

    @property
    def resolved_rate_limit_redis_url(self) -> str | None:
        if self.rate_limit_redis_url:
            return self.rate_limit_redis_url
        broker = self.resolved_broker_url
        return broker if broker.startswith(("redis://", "rediss://")) else None

    @property
    def is_filesystem_broker(self) -> bool:
        return self.resolved_broker_url.startswith("filesystem://")


@lru_cache
def get_settings() -> Settings:
    return Settings()
