"""Server-side latency from the API's own ``/metrics`` histogram, as a check on the client's clock.

Why: on a small machine the load generator shares the CPU with the service, so a client-measured
latency includes time the request spent waiting in the generator's event loop. The difference of
two scrapes of ``vitq_http_request_duration_seconds`` gives what the server itself saw, per route.
"""

from __future__ import annotations

import re
from collections import defaultdict

import httpx

BUCKET_RE = re.compile(r"^vitq_http_request_duration_seconds_bucket\{([^}]*)\} ([0-9.e+-]+)$", re.M)
LABEL_RE = re.compile(r'(\w+)="([^"]*)"')
ROUTES = {"submit": ("POST", "/v1/jobs"), "poll": ("GET", "/v1/jobs/{job_id}")}

Buckets = dict[tuple[str, str], dict[float, float]]


def scrape_buckets(http: httpx.Client | None, url: str) -> Buckets:
    """Cumulative bucket counts per (method, route), summed over statuses."""
    text = (http.get("/metrics") if http is not None else httpx.get(f"{url}/metrics", timeout=30)).text
    out: Buckets = defaultdict(lambda: defaultdict(float))
    for labels_text, value in BUCKET_RE.findall(text):
        labels = dict(LABEL_RE.findall(labels_text))
        le = float("inf") if labels["le"] == "+Inf" else float(labels["le"])
        out[(labels["method"], labels["route"])][le] += float(value)
    return out


def quantile_upper_bound(before: Buckets, after: Buckets, key: tuple[str, str], q: float) -> float | None:
    """The smallest bucket bound below which a fraction ``q`` of the requests between the scrapes fell."""
    now, then = after.get(key, {}), before.get(key, {})
    bounds = sorted(now)
    if not bounds:
        return None
    total = now[float("inf")] - then.get(float("inf"), 0.0)
    if total <= 0:
        return None
    for bound in bounds:
        if now[bound] - then.get(bound, 0.0) >= q * total:
            return bound
    return float("inf")


def server_side(before: Buckets, after: Buckets) -> dict[str, dict[str, float | None]]:
    result: dict[str, dict[str, float | None]] = {}
    for name, key in ROUTES.items():
        p50 = quantile_upper_bound(before, after, key, 0.50)
        p99 = quantile_upper_bound(before, after, key, 0.99)
        result[name] = {
            "p50_ms_at_most": None if p50 is None else 1000 * p50,
            "p99_ms_at_most": None if p99 is None else 1000 * p99,
        }
    return result
