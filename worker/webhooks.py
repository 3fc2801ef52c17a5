"""Signed job-end webhooks (Standard Webhooks: ``webhook-id``, ``webhook-timestamp``, ``webhook-signature``).

signature = ``v1,`` + base64(HMAC-SHA256(secret, f"{id}.{timestamp}.{body}")), where the secret is the
tenant's ``whsec_<base64>`` (``GET /v1/tenant``). Every attempt is recorded in the job's event log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import httpx
from sqlalchemy import func, select

from service.db import session_scope
from service.settings import Settings
from service.tables import Job, JobEvent, JobStatus, Tenant
from service.webhook_targets import Target, WebhookTargetError, check


class WebhookDeliveryError(Exception):
    """A failed attempt worth retrying (network error, 5xx, …)."""


class WebhookRefused(Exception):
    """An attempt that retrying cannot fix: the target is refused by the SSRF guard, or redirected."""


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance_s: int = 300) -> bool:
    """What a receiver runs (used by the tests; shown in docs/service.md)."""
    timestamp = int(headers["webhook-timestamp"])
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    expected = sign(secret, headers["webhook-id"], timestamp, body)
    return any(hmac.compare_digest(expected, s) for s in headers["webhook-signature"].split())


def payload(job: Job) -> dict[str, Any]:
    return {
        "type": f"job.{job.status}",
        "timestamp": job.finished_at.isoformat() if job.finished_at else None,
        "data": {
            "id": job.id,
            "status": job.status,
            "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
            "result": job.result,
            "links": {"self": f"/v1/jobs/{job.id}", "artifacts": f"/v1/jobs/{job.id}/artifacts"},
        },
    }


def deliver_once(settings: Settings, job_id: str) -> bool | None:
    """One attempt. True: delivered; None: nothing to send; raises WebhookDeliveryError to retry."""
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(Job, job_id)
        if job is None or not job.webhook_url or not JobStatus(job.status).finished:
            return None
        tenant = session.get(Tenant, job.tenant_id)
        assert tenant is not None  # foreign key
        attempt = 1 + (
            session.scalar(
                select(func.count())
                .select_from(JobEvent)
                .where(JobEvent.job_id == job_id, JobEvent.kind == "webhook")
            )
            or 0
        )
        url, secret = job.webhook_url, tenant.webhook_secret
        body = json.dumps(payload(job), separators=(",", ":")).encode()
        msg_id = f"msg_{job.id}_{job.status}"
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": "vitq-webhooks/1",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }
    status_code: int | None = None
    error: str | None = None
    retry = True
    try:
        target = check(url, settings)  # resolved again now; the connection goes to the checked address
    except WebhookTargetError as exc:
        ok, retry, error = False, False, str(exc)
    else:
        try:
            response = post(target, body, headers, timeout=settings.webhook_timeout_s)
            status_code = response.status_code
            ok = 200 <= status_code < 300
            if response.is_redirect:
                retry = False
                error = f"HTTP {status_code}: redirects are not followed"
            elif not ok:
                error = f"HTTP {status_code}"
        except httpx.HTTPError as exc:
            ok = False
            error = f"{type(exc).__name__}: {str(exc)[:200]}"
    with session_scope(settings.resolved_database_url) as session:
        if session.get(Job, job_id) is None:  # deleted meanwhile: nothing to record
            return None
        session.add(
            JobEvent(
                job_id=job_id,
                kind="webhook",
                message="delivered" if ok else f"failed: {error}",
                data={"attempt": attempt, "ok": ok, "status_code": status_code, "error": error},
            )
        )
    if not ok:
        raise (WebhookDeliveryError if retry else WebhookRefused)(error or "delivery failed")
    return True


def build_request(client: httpx.Client, target: Target, body: bytes, headers: dict[str, str]) -> httpx.Request:
    """The POST to the checked address: the URL names the IP, ``Host`` the name, and for https the TLS
    server name (SNI and the certificate check) is the name as well."""
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    return client.build_request(
        "POST",
        target.pinned_url,
        content=body,
        headers={**headers, "host": target.host_header},
        extensions=extensions,
    )


def post(target: Target, body: bytes, headers: dict[str, str], *, timeout: float) -> httpx.Response:
    # trust_env=False: no proxy from the environment gets to pick another destination.
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        return client.send(build_request(client, target, body, headers), follow_redirects=False)
