"""SQLAlchemy 2 tables. The schema is made only by Alembic (migrations/); a test checks they agree."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC on every backend, returned timezone-aware (UTC)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """``<prefix>_<12 hex ms timestamp><12 hex random>``: unique and sortable by creation time."""
    return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


FINISHED_STATUSES = [s.value for s in JobStatus if s.finished]


class JobErrorCode(StrEnum):
    """Why a job failed (stored on the row, returned by the API)."""

    INVALID_CONFIG = "invalid_config"
    INVALID_MODEL = "invalid_model"
    INVALID_DATASET = "invalid_dataset"
    INVALID_CHECKPOINT = "invalid_checkpoint"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    WORKER_LOST = "worker_lost"
    BROKER_UNAVAILABLE = "broker_unavailable"
    STORAGE = "storage_error"
    """The artifact store or the worker's scratch disk could not be written (full, unwritable)."""
    RESULT_NOT_RECORDED = "result_not_recorded"
    """The run finished but its success could not be written (the worker drops its stored files and
    fails the job rather than letting it be re-queued and computed again)."""
    INTERNAL = "internal_error"


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime()}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    webhook_secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The tenant's own limits; NULL takes the default from settings (``service.quotas``).
    rate_limit_rps: Mapped[float | None] = mapped_column(Float, default=None)
    rate_limit_burst: Mapped[int | None] = mapped_column(Integer, default=None)
    max_active_jobs: Mapped[int | None] = mapped_column(Integer, default=None)
    max_storage_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)


class ApiKey(Base):
    """An API key, stored as the SHA-256 of the (high-entropy, random) key; never in clear."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(300))
    format: Mapped[str] = mapped_column(String(20))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    n: Mapped[int] = mapped_column(Integer)
    image_shape: Mapped[list[int]] = mapped_column(JSON)
    num_classes: Mapped[int | None] = mapped_column(Integer, default=None)
    has_labels: Mapped[bool] = mapped_column(Boolean)
    normalized: Mapped[bool] = mapped_column(Boolean, default=False)
    """Float images already normalised for one input size (core does not resize them)."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Model(Base):
    """An uploaded checkpoint (safetensors in the artifact store) and the timm spec it fits."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(300))
    timm_name: Mapped[str] = mapped_column(String(200))
    timm_kwargs: Mapped[dict[str, Any]] = mapped_column(JSON)
    preprocess: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        Index("ix_jobs_tenant_status", "tenant_id", "status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.QUEUED.value, index=True)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    """The validated request body, as the client sent it (after defaults)."""
    model_key: Mapped[str] = mapped_column(String(300))
    """What ``/v1/results?model=`` filters on: built-in id, uploaded model id, or timm name."""
    model_spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    calibration: Mapped[str] = mapped_column(String(300))
    evaluation: Mapped[str | None] = mapped_column(String(300), default=None)
    request_hash: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    webhook_url: Mapped[str | None] = mapped_column(Text, default=None)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    error_code: Mapped[str | None] = mapped_column(String(50), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[str | None] = mapped_column(String(200), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    artifacts_expired: Mapped[bool] = mapped_column(Boolean, default=False)
    """The retention pass removed the artifacts (``VITQ_RETENTION_DAYS``); the row stays."""


class JobEvent(Base):
    """The job's event log: state changes, stages, retries, webhook delivery attempts."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(40))
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class Artifact(Base):
    """A file a job produced; its bytes live in the artifact store under ``sha256``."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifacts_job_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    content_type: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Report(Base):
    """The accuracy report of a finished job, queryable (``GET /v1/results``)."""

    __tablename__ = "reports"
    __table_args__ = (Index("ix_reports_lookup", "tenant_id", "model_key", "w_bits", "a_bits", "method"),)

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    model_key: Mapped[str] = mapped_column(String(300))
    w_bits: Mapped[int] = mapped_column(Integer)
    a_bits: Mapped[int] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(String(40))
    preset: Mapped[str] = mapped_column(String(40))
    fp_top1: Mapped[float | None] = mapped_column(Float, default=None)
    fp_top5: Mapped[float | None] = mapped_column(Float, default=None)
    quant_top1: Mapped[float | None] = mapped_column(Float, default=None)
    quant_top5: Mapped[float | None] = mapped_column(Float, default=None)
    n_eval: Mapped[int | None] = mapped_column(Integer, default=None)
    agreement: Mapped[float | None] = mapped_column(Float, default=None)
    logit_sqnr_db: Mapped[float | None] = mapped_column(Float, default=None)
    seconds_total: Mapped[float | None] = mapped_column(Float, default=None)
    report: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Blob(Base):
    """One row per blob a writer or the collector has locked (``service.blob_gc``).

    Writers (uploads, the worker's artifacts) and the collector take this row's lock (an upsert) in
    the transaction that adds or removes the rows referencing ``sha256``, so a blob is never removed
    while a row that needs it is being recorded. The bytes are in the artifact store.
    """

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    held_at: Mapped[datetime] = mapped_column(default=utcnow)
