"""Per-tenant limits: the request rate per API key, queued + running jobs, and bytes of uploads.

Each limit is the tenant's own value (``tenants.rate_limit_rps`` …, set with ``vitq tenants limits``)
or, where that is NULL, the default from settings; 0 means no limit. The counts come from the database
and the rate-limit counters from Redis (``api/rate_limit.py``), so every API process enforces the same
numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db import for_update
from service.settings import Settings
from service.tables import FINISHED_STATUSES, Dataset, Job, Model, Tenant


@dataclass(frozen=True)
class TenantLimits:
    rate_limit_rps: float
    rate_limit_burst: int
    max_active_jobs: int
    max_storage_bytes: int


def limits_for(settings: Settings, tenant: Tenant) -> TenantLimits:
    def pick(own: float | int | None, default: float | int) -> float | int:
        return default if own is None else own

    return TenantLimits(
        rate_limit_rps=float(pick(tenant.rate_limit_rps, settings.rate_limit_rps)),
        rate_limit_burst=int(pick(tenant.rate_limit_burst, settings.rate_limit_burst)),
        max_active_jobs=int(pick(tenant.max_active_jobs, settings.max_active_jobs)),
        max_storage_bytes=int(pick(tenant.max_storage_bytes, settings.max_storage_bytes)),
    )


class QuotaExceeded(Exception):
    """A tenant limit refused the request; ``quota`` names it, ``retry_after_s`` is set when waiting helps."""

    def __init__(self, quota: str, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.quota = quota
        self.message = message
        self.retry_after_s = retry_after_s


def active_jobs(session: Session, tenant_id: str) -> int:
    query = select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant_id, Job.status.not_in(FINISHED_STATUSES)
    )
    return int(session.scalar(query) or 0)


def storage_bytes(session: Session, tenant_id: str) -> int:
    """Bytes of the tenant's uploads (datasets + models), each upload counted in full even when its blob
    is shared with another row: what a tenant is charged for does not depend on other tenants."""
    total = 0
    for table in (Dataset, Model):
        total += int(
            session.scalar(select(func.coalesce(func.sum(table.size_bytes), 0)).where(table.tenant_id == tenant_id))
            or 0
        )
    return total


def lock_tenant(session: Session, tenant_id: str) -> None:
    """Serialise this tenant's quota checks until the caller commits (a row lock on PostgreSQL, the
    database write lock on SQLite: ``service.db.for_update``), so two requests, in one API process or
    several, cannot both take the last slot."""
    session.execute(for_update(session, select(Tenant.id).where(Tenant.id == tenant_id)))


def check_active_jobs(session: Session, settings: Settings, tenant: Tenant) -> None:
    limit = limits_for(settings, tenant).max_active_jobs
    if limit <= 0:
        return
    lock_tenant(session, tenant.id)
    count = active_jobs(session, tenant.id)
    if count >= limit:
        raise QuotaExceeded(
            "max_active_jobs",
            f"quota max_active_jobs: tenant {tenant.name!r} has {count} queued or running job(s) and may "
            f"have at most {limit}; submit again when one ends",
            retry_after_s=30,
        )


def check_storage(session: Session, settings: Settings, tenant: Tenant, *, adding: int, lock: bool = False) -> None:
    """``adding`` more bytes within ``max_storage_bytes``? Uploads check twice: before the bytes are
    validated (a cheap refusal), and with ``lock`` in the transaction that records the row, the tenant
    locked until it commits: two concurrent uploads then cannot both take the last room."""
    limit = limits_for(settings, tenant).max_storage_bytes
    if limit <= 0:
        return
    if lock:
        lock_tenant(session, tenant.id)
    used = storage_bytes(session, tenant.id)
    if used + adding > limit:
        raise QuotaExceeded(
            "max_storage_bytes",
            f"quota max_storage_bytes: tenant {tenant.name!r} keeps {used} bytes of uploads; {adding} more "
            f"would pass its limit of {limit} bytes (delete datasets or models to make room)",
        )


def set_limits(session: Session, tenant: Tenant, **values: float | int | None) -> Tenant:
    """Set (a number) or reset to the default (``None``) the given limits of one tenant."""
    for name, value in values.items():
        if name not in TenantLimits.__dataclass_fields__:
            raise ValueError(f"unknown limit {name!r}")
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0")
        setattr(tenant, name, value)
    return tenant
