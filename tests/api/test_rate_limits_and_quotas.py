"""Per-tenant rate limit and quotas, in-process over PostgreSQL (and Redis for the shared counter).

Two API processes sharing the Redis counter, and a second tenant's latency while the first is limited,
are in tests/e2e/test_multi_tenant.py.
"""

from __future__ import annotations

import secrets
import time

from sqlalchemy import select

from api.rate_limit import RedisLimiter
from service.db import session_scope
from service.keys import create_key
from service.quotas import set_limits
from service.tables import Tenant
from tests.helpers.factories import auth, write_npz
from tests.helpers.jobs import SMOKE


def _tenant(database_url: str, **limits) -> str:
    """A fresh tenant with its own limits; returns its API key."""
    with session_scope(database_url) as session:
        new = create_key(session, tenant_name=f"limits-{secrets.token_hex(4)}")
        tenant = session.scalar(select(Tenant).where(Tenant.id == new.tenant_id))
        set_limits(session, tenant, **limits)
    return new.key


def test_over_the_rate_limit_is_429_with_retry_after_and_ratelimit_headers(service):
    key = _tenant(service.settings.resolved_database_url, rate_limit_rps=1, rate_limit_burst=3)
    other = _tenant(service.settings.resolved_database_url)  # the defaults (100/s, bursts of 200)
    answers = [service.client.get("/v1/jobs", headers=auth(key)) for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert [r.headers["RateLimit-Remaining"] for r in answers] == ["2", "1", "0", "0"]
    assert all(r.headers["RateLimit-Limit"] == "3" for r in answers)
    assert answers[0].headers["RateLimit-Policy"].startswith("3;w=3")
    limited = answers[3]
    assert int(limited.headers["Retry-After"]) >= 1
    error = limited.json()["error"]
    assert error["code"] == "rate_limited" and "1 requests per second per API key" in error["message"]
    # another tenant is not limited by the first one's bucket
    assert service.client.get("/v1/jobs", headers=auth(other)).status_code == 200
    time.sleep(int(limited.headers["Retry-After"]))
    assert service.client.get("/v1/jobs", headers=auth(key)).status_code == 200


def test_active_jobs_quota_names_the_quota(service):
    key = _tenant(service.settings.resolved_database_url, max_active_jobs=2)
    ids = []
    for _ in range(2):
        response = service.client.post("/v1/jobs", json=SMOKE, headers=auth(key))
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    refused = service.client.post("/v1/jobs", json=SMOKE, headers=auth(key))
    assert refused.status_code == 429 and refused.headers["Retry-After"]
    error = refused.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert "max_active_jobs" in error["message"] and "at most 2" in error["message"]
    assert len(service.client.get("/v1/jobs", headers=auth(key)).json()["data"]) == 2
    assert service.client.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth(key)).status_code == 202
    assert service.client.post("/v1/jobs", json=SMOKE, headers=auth(key)).status_code == 202  # room again


def test_storage_quota_counts_a_tenants_uploads(service, tmp_path):
    npz = write_npz(tmp_path / "d.npz", n=32)
    size = npz.stat().st_size
    key = _tenant(service.settings.resolved_database_url, max_storage_bytes=size + size // 2)
    with open(npz, "rb") as f:
        first = service.client.post("/v1/datasets", files={"file": ("d.npz", f)}, headers=auth(key))
    assert first.status_code == 201, first.text
    with open(npz, "rb") as f:
        second = service.client.post("/v1/datasets", files={"file": ("d.npz", f)}, headers=auth(key))
    assert second.status_code == 409, second.text
    error = second.json()["error"]
    assert error["code"] == "quota_exceeded" and "max_storage_bytes" in error["message"]
    assert [d["id"] for d in service.client.get("/v1/datasets", headers=auth(key)).json()["data"]] == [
        first.json()["id"]
    ]
    # deleting makes room
    assert service.client.delete(f"/v1/datasets/{first.json()['id']}", headers=auth(key)).status_code == 204
    with open(npz, "rb") as f:
        assert service.client.post("/v1/datasets", files={"file": ("d.npz", f)}, headers=auth(key)).status_code == 201


def test_redis_counter_is_one_bucket_for_every_limiter(redis_url):
    """Two limiters (as in two API processes) on one Redis draw from the same bucket."""
    first, second = RedisLimiter(redis_url), RedisLimiter(redis_url)
    key = f"test-{secrets.token_hex(6)}"
    decisions = [(first if i % 2 else second).hit(key, rps=0.5, burst=4) for i in range(8)]
    assert [d.allowed for d in decisions] == [True] * 4 + [False] * 4
    assert decisions[4].retry_after_s > 1.0
    assert RedisLimiter("redis://127.0.0.1:1/0").hit(key, rps=1, burst=1) is None  # Redis down: not limited
