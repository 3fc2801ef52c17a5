"""``/v1/jobs``: create (idempotent), read, list with cursor pagination, cancel, event log."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from api.errors import ApiError
from api.jobs_view import check_cursor, get_job, job_public, lock_job, reread_job
from api.request_body import StrictRoute
from api.schemas import JobCreate, JobEventPublic, JobEventsPublic, JobPublic, JobsPublic
from core import QuantConfig
from service import blob_gc, lifecycle
from service.job_inputs import check_data_fits, describe_data, resolve_model, target_base_config
from service.queue import send_run_job, send_webhook
from service.quotas import QuotaExceeded, check_active_jobs
from service.tables import Job, JobEvent, JobStatus, new_id
from service.webhook_targets import WebhookTargetError
from service.webhook_targets import check as check_webhook_target

log = logging.getLogger("vitq.api")
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=StrictRoute)
RETRY_AFTER_S = "2"
CANCEL_TRIES = 3


def _request_hash(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _job_response(response: Response, session: SessionDep, job: Job) -> JobPublic:
    if not JobStatus(job.status).finished:
        response.headers["Retry-After"] = RETRY_AFTER_S
    return job_public(session, job)


@router.post("", status_code=202, summary="Create a quantization job")
def create_job(
    body: JobCreate,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    tenant: TenantDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobPublic:
    request_hash = _request_hash(body)
    if idempotency_key is not None:
        existing = session.scalar(
            select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == idempotency_key)
        )
        if existing is not None:
            return _replay(existing, request_hash, response, session)

    options = body.options.model_dump(exclude_none=True)
    if body.target is not None:
        config = target_base_config(body.target.model_dump(exclude_none=True), method=body.method,
                                    preset=body.preset, options=options)
    else:
        config = QuantConfig(
            w_bits=body.w_bits, a_bits=body.a_bits, method=body.method, preset=body.preset, **options
        ).resolved()
    model_ref = body.model.model_dump() if not isinstance(body.model, str) else body.model
    model = resolve_model(
        session, store, tenant_id=tenant.id, ref=model_ref, cache_dir=settings.resolved_cache_dir,
        max_parameters=settings.max_model_parameters, hub=settings.hub_policy(),
    )
    calib = describe_data(session, tenant_id=tenant.id, ref=body.calibration, role="calibration")
    check_data_fits(model.spec, calib, role="calibration")
    if body.evaluation is not None:
        evaluation = describe_data(session, tenant_id=tenant.id, ref=body.evaluation, role="evaluation")
        check_data_fits(model.spec, evaluation, role="evaluation")

    if body.webhook_url is not None:
        check_webhook_url(body.webhook_url, settings)
    check_job_quota(session, settings, tenant)

    job = Job(
        id=new_id("job"),
        tenant_id=tenant.id,
        request=body.model_dump(mode="json"),
        model_key=model.key,
        model_spec=model.stored,
        config=config.to_dict(),
        calibration=body.calibration,
        evaluation=body.evaluation,
        request_hash=request_hash,
        idempotency_key=idempotency_key,
        webhook_url=body.webhook_url,
    )
    lifecycle.create(session, job, queue=settings.queue)
    try:
        session.commit()
    except IntegrityError:  # a concurrent request with the same Idempotency-Key won
        session.rollback()
        existing = session.scalar(
            select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == idempotency_key)
        )
        if existing is None:
            raise
        return _replay(existing, request_hash, response, session)

    try:
        send_run_job(settings, job.id)
    except Exception as exc:  # broker down: the job must not stay queued forever
        log.exception("could not enqueue job %s", job.id)
        lifecycle.fail_unsent(session, job_id=job.id, message=f"could not reach the broker: {type(exc).__name__}")
        session.commit()
        raise ApiError(503, "broker_unavailable", "the job queue is unreachable; try again later") from None

    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return _job_response(response, session, job)


def check_webhook_url(url: str, settings: SettingsDep) -> None:
    """The SSRF guard at submit: 422 saying why an internal or disallowed target is refused."""
    try:
        check_webhook_target(url, settings)
    except WebhookTargetError as exc:
        raise ApiError(422, "webhook_url_refused", str(exc)) from None


def check_job_quota(session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> None:
    """At most ``max_active_jobs`` queued + running jobs per tenant (429 naming the quota)."""
    try:
        check_active_jobs(session, settings, tenant)
    except QuotaExceeded as exc:
        session.rollback()
        raise ApiError(429, "quota_exceeded", exc.message, {"Retry-After": str(exc.retry_after_s or 30)}) from None


def _replay(existing: Job, request_hash: str, response: Response, session: SessionDep) -> JobPublic:
    if existing.request_hash != request_hash:
        raise ApiError(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was already used with a different request body",
        )
    response.headers["Location"] = f"/v1/jobs/{existing.id}"
    return _job_response(response, session, existing)


@router.get("", summary="List jobs, newest first")
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=100)] = None,
) -> JobsPublic:
    query = select(Job).where(Job.tenant_id == tenant.id)
    if status is not None:
        query = query.where(Job.status == status)
    if cursor is not None:
        query = query.where(Job.id < check_cursor(cursor))
    rows = session.scalars(query.order_by(Job.id.desc()).limit(limit + 1)).all()
    page = rows[:limit]
    next_cursor = page[-1].id if len(rows) > limit else None
    return JobsPublic(data=[job_public(session, j) for j in page], next_cursor=next_cursor)


@router.get("/{job_id}", summary="A job's status, progress, error and result")
def read_job(job_id: str, response: Response, session: SessionDep, tenant: TenantDep) -> JobPublic:
    return _job_response(response, session, get_job(session, tenant_id=tenant.id, job_id=job_id))


@router.post("/{job_id}/cancel", status_code=202, summary="Cancel a job (cooperative while running)")
def cancel_job(
    job_id: str, response: Response, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> JobPublic:
    """409 when the job already finished; 404 when it is gone, also when a DELETE of it won the race
    (its row vanished between the read and the update, or right after the cancel)."""
    job = get_job(session, tenant_id=tenant.id, job_id=job_id)
    cancelled_queued = False
    for _ in range(CANCEL_TRIES):  # the row may move (claimed, re-queued, deleted) between the read and the update
        if job.status == JobStatus.QUEUED.value:
            cancelled_queued = lifecycle.cancel_queued(session, job_id=job.id, attempt=job.attempts)
            if cancelled_queued:
                break
        elif job.status == JobStatus.RUNNING.value:
            if lifecycle.request_cancel(session, job_id=job.id, attempt=job.attempts):
                break
        else:
            break
        session.rollback()
        job = reread_job(session, tenant_id=tenant.id, job_id=job_id)
    else:
        raise ApiError(409, "job_busy", f"job {job.id} changed while it was being cancelled; try again")
    if JobStatus(job.status).finished and not cancelled_queued:
        raise ApiError(409, "job_finished", f"job {job.id} already finished ({job.status})")
    session.commit()
    job = reread_job(session, tenant_id=tenant.id, job_id=job_id)
    if cancelled_queued and job.webhook_url:
        try:
            send_webhook(settings, job.id)
        except Exception:
            log.exception("could not enqueue webhook for job %s", job.id)
    return _job_response(response, session, job)


@router.get("/{job_id}/events", summary="The job's event log")
def job_events(job_id: str, session: SessionDep, tenant: TenantDep) -> JobEventsPublic:
    job = get_job(session, tenant_id=tenant.id, job_id=job_id)
    events = session.scalars(select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id)).all()
    return JobEventsPublic(
        data=[JobEventPublic(at=e.at, kind=e.kind, message=e.message, data=e.data) for e in events]
    )


@router.delete("/{job_id}", status_code=204, summary="Delete a job: cancel it if unfinished, remove its artifacts")
def delete_job(job_id: str, session: SessionDep, store: StoreDep, tenant: TenantDep) -> Response:
    """A queued job is cancelled, a running one asked to stop (its worker finds the row gone at its next
    heartbeat and drops the work); then the row, its events, report and artifact rows go, and each blob
    no other row names (any tenant's) is removed from the store."""
    get_job(session, tenant_id=tenant.id, job_id=job_id)
    job = lock_job(session, tenant_id=tenant.id, job_id=job_id)  # 404 for the loser of two DELETEs
    if job.status == JobStatus.QUEUED.value:
        lifecycle.cancel_queued(session, job_id=job.id, attempt=job.attempts)
    elif job.status == JobStatus.RUNNING.value:
        lifecycle.request_cancel(session, job_id=job.id, attempt=job.attempts)
    shas = blob_gc.delete_job(session, job.id)
    session.commit()
    blob_gc.release(session, store, shas)
    return Response(status_code=204)
