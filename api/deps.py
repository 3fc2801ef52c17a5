"""Typed dependencies: settings, database session, artifact store, the caller's tenant."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.errors import ApiError
from api.rate_limit import RecentLimits, limiter_for
from service.db import session_factory
from service.keys import authenticate, hash_key
from service.quotas import TenantLimits, limits_for
from service.settings import Settings
from service.storage import ArtifactStore, get_store
from service.tables import Tenant

# The cheap dependencies are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in the
# threadpool, and each such hop cost more CPU than the work itself (profiled under `vitq loadtest`).


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


async def get_session(settings: SettingsDep) -> AsyncIterator[Session]:
    """A session per request. Creating it does no I/O; closing it on the event loop (a ROLLBACK on a
    local socket when a transaction is open) needs no threadpool slot, so a request that holds a
    pooled connection can always give it back, however many threads wait for one."""
    session = session_factory(settings.resolved_database_url)()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
"""``scope="function"``: the session is closed when the route function returns, before the response is
sent. Why: a download streams for as long as the client takes to read it, and a client that stops
reading would otherwise keep the pooled connection of its last query (issue 19: two dozen stalled
downloads took the whole pool, and every other tenant got 503 after the pool timeout)."""


async def get_store_dep(settings: SettingsDep) -> ArtifactStore:
    return get_store(settings.resolved_storage_dir)


StoreDep = Annotated[ArtifactStore, Depends(get_store_dep)]

_recent_limits = RecentLimits()
"""The limits of keys that authenticated in the last few seconds (by key digest, never the key): a
flooding key's 429 then costs one Redis call and no database query. A changed limit applies within
``RecentLimits.ttl_s``; a key revoked meanwhile gets 429 or 401, never access."""

_recent_refusals = RecentLimits()
"""Key digests refused in the last few seconds: a client retrying in a loop with a revoked or mistyped
key gets its 401 without a database query each time. A refused digest cannot turn valid within the TTL:
keys are random (``service.keys.create_key``) and a revoked key stays revoked."""

bearer = HTTPBearer(auto_error=False, description="An API key from `vitq keys create`.")


AUTHENTICATED_SCOPE_KEY = "vitq.authenticated"
"""Where :func:`authenticate_early` leaves its result in the request scope for :func:`get_tenant`."""


@dataclass(frozen=True)
class Authenticated:
    """A request's tenant and the rate-limit headers its response carries."""

    tenant: Tenant
    headers: dict[str, str]


def authenticate_request(settings: Settings, credentials: HTTPAuthorizationCredentials | None) -> Authenticated:
    """The caller's tenant, or ``ApiError`` 401/429. Blocking (one indexed query in a session of its own,
    closed before returning, so no pooled connection outlives the check); run it in a thread."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ApiError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'", challenge)
    digest = hash_key(credentials.credentials)[:32]
    if _recent_refusals.get(digest) is not None:
        raise ApiError(401, "unauthorized", "invalid or revoked API key", challenge)
    headers: dict[str, str] = {}
    known = _recent_limits.get(digest)
    if known is not None:  # a key seen in the last seconds: an over-limit request is refused before the database
        headers = _rate_limit(settings, known, digest)
    with session_factory(settings.resolved_database_url)() as session:
        tenant = authenticate(session, key=credentials.credentials)
    if tenant is None:
        _recent_refusals.put(digest, True)
        raise ApiError(401, "unauthorized", "invalid or revoked API key", challenge)
    limits = limits_for(settings, tenant)
    _recent_limits.put(digest, limits)
    if known is None:
        headers = _rate_limit(settings, limits, digest)
    return Authenticated(tenant, headers)


async def authenticate_early(request: Request) -> None:
    """Authenticate from the headers alone, before the body is read (``api.request_body.StrictRoute``
    calls it): an unauthenticated client gets its 401 without the server receiving, buffering or
    parsing its body. FastAPI reads a route's body before it solves any dependency, so ``get_tenant``
    alone would come too late; it then finds this result and does not query again."""
    settings: Settings = request.app.state.settings
    credentials = await bearer(request)
    request.scope[AUTHENTICATED_SCOPE_KEY] = await run_in_threadpool(authenticate_request, settings, credentials)


def get_tenant(
    request: Request,
    settings: SettingsDep,
    response: Response,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Tenant:
    done = request.scope.get(AUTHENTICATED_SCOPE_KEY)
    if done is None:
        done = authenticate_request(settings, credentials)
    response.headers.update(done.headers)
    return done.tenant


def _rate_limit(settings: Settings, limits: TenantLimits, digest: str) -> dict[str, str]:
    """Requests per second per API key, counted in Redis across API processes (``api/rate_limit.py``);
    returns the ``RateLimit-*`` headers of an allowed request."""
    if limits.rate_limit_rps <= 0:
        return {}
    decision = limiter_for(settings.resolved_rate_limit_redis_url).hit(
        digest, rps=limits.rate_limit_rps, burst=limits.rate_limit_burst
    )
    if decision is None:  # Redis unreachable: not limited
        return {}
    headers = decision.headers()
    if not decision.allowed:
        raise ApiError(
            429,
            "rate_limited",
            f"rate limit: at most {limits.rate_limit_rps:g} requests per second per API key (bursts of "
            f"{limits.rate_limit_burst}); retry after {headers['Retry-After']} s",
            headers,
        )
    return headers


TenantDep = Annotated[Tenant, Depends(get_tenant)]
