"""Requests per second per API key: GCRA (a token bucket kept as one timestamp) in Redis.

Every API process shares the counter: one Lua script reads and moves the key's "theoretical arrival
time" atomically, with Redis's own clock, so processes on different hosts agree without synchronised
clocks. Over the limit the request gets 429 with ``Retry-After``; every answer carries the
``RateLimit-Limit`` / ``RateLimit-Remaining`` / ``RateLimit-Reset`` headers and ``RateLimit-Policy``
(IETF httpapi rate-limit headers draft). Without Redis (the embedded default runs one API process) the
same algorithm runs in process memory. If Redis cannot be reached the request is let through (logged):
the limiter protects the service, it must not take it down with Redis.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("vitq.api")

GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if now < allow_at then
  return {0, tostring(allow_at - now), tostring(tat - now)}
end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1000)
return {1, tostring(now - allow_at), tostring(new_tat - now)}
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: float
    """Seconds until the bucket is full again."""
    retry_after_s: float
    """Seconds until the next request would be allowed (0 when allowed)."""
    policy: str

    def headers(self) -> dict[str, str]:
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(math.ceil(self.reset_s)),
            "RateLimit-Policy": self.policy,
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return headers


def _decision(allowed: bool, slack_or_wait: float, reset_s: float, rps: float, burst: int) -> Decision:
    interval = 1.0 / rps
    remaining = max(0, int(slack_or_wait / interval + 1e-9)) if allowed else 0
    return Decision(
        allowed=allowed,
        limit=burst,
        remaining=min(burst, remaining),
        reset_s=max(0.0, reset_s),
        retry_after_s=0.0 if allowed else slack_or_wait,
        policy=f"{burst};w={max(1, math.ceil(burst / rps))};burst={burst};rate={rps:g}",
    )


class RedisLimiter:
    def __init__(self, url: str) -> None:
        import redis

        self._client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._script = self._client.register_script(GCRA_LUA)
        self._warned_at = 0.0
        self._skip_until = 0.0

    RETRY_REDIS_AFTER_S = 5.0
    """After a failed call, requests skip Redis this long: a silent Redis host costs one timeout per
    5 s, not one per request."""

    def hit(self, key: str, *, rps: float, burst: int) -> Decision | None:
        if time.monotonic() < self._skip_until:
            return None
        try:
            allowed, a, b = self._script(keys=[f"vitq:ratelimit:{key}"], args=[1.0 / rps, burst])
        except Exception as exc:  # Redis down or slow: let the request through
            now = time.monotonic()
            self._skip_until = now + self.RETRY_REDIS_AFTER_S
            if now - self._warned_at > 30:
                self._warned_at = now
                log.warning("rate limiter: Redis unreachable (%s); requests are not limited", type(exc).__name__)
            return None
        return _decision(bool(int(allowed)), float(a), float(b), rps, burst)


class MemoryLimiter:
    """The same GCRA in one process (the embedded default, which has no Redis and one API process)."""

    def __init__(self) -> None:
        self._tat: dict[str, float] = {}
        self._lock = threading.Lock()

    def hit(self, key: str, *, rps: float, burst: int) -> Decision:
        interval = 1.0 / rps
        with self._lock:
            now = time.monotonic()
            tat = max(self._tat.get(key, 0.0), now)
            new_tat = tat + interval
            allow_at = new_tat - burst * interval
            if now < allow_at:
                return _decision(False, allow_at - now, tat - now, rps, burst)
            self._tat[key] = new_tat
            if len(self._tat) > 100_000:  # forget full buckets
                self._tat = {k: v for k, v in self._tat.items() if v > now}
            return _decision(True, now - allow_at, new_tat - now, rps, burst)


class RecentLimits:
    """A small time-bounded map from a key digest to what was learnt about it: its tenant's limits, or
    that it was refused (see ``api.deps``). Bounded: when full, expired entries go, then all."""

    ttl_s = 5.0

    def __init__(self, max_entries: int = 10_000) -> None:
        self._entries: dict[str, tuple[float, object]] = {}
        self._max = max_entries
        self._lock = threading.Lock()

    def get(self, digest: str):  # noqa: ANN201 - TenantLimits (service.quotas), kept untyped here
        entry = self._entries.get(digest)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, digest: str, limits: object) -> None:
        with self._lock:
            if len(self._entries) >= self._max:
                now = time.monotonic()
                self._entries = {k: v for k, v in self._entries.items() if v[0] >= now}
                if len(self._entries) >= self._max:
                    self._entries.clear()
            self._entries[digest] = (time.monotonic() + self.ttl_s, limits)


_limiters: dict[str, RedisLimiter | MemoryLimiter] = {}
_limiters_lock = threading.Lock()


def limiter_for(redis_url: str | None) -> RedisLimiter | MemoryLimiter:
    key = redis_url or "memory"
    with _limiters_lock:
        if key not in _limiters:
            _limiters[key] = RedisLimiter(redis_url) if redis_url else MemoryLimiter()
        return _limiters[key]
