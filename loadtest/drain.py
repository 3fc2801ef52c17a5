"""`vitq-loadtest --drain-jobs N`: queue N trivially quick jobs, watch `/metrics` while the workers
drain them, and check they ran in submission order.

Why: the queue is the service's other load path. Jobs are submitted one after another (so their
creation order is the order they entered the broker); the workers must take them first in, first
out (a job may overtake its neighbour only by as many places as there are workers), and the queue
depth and job durations must be visible in Prometheus while it happens.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from typing import Any

import httpx

from loadtest.load import SMOKE_JOB, percentile

METRIC_RE = re.compile(r'^(vitq_queue_depth|vitq_jobs\{status="(\w+)"\}) ([0-9.e+]+)$', re.M)
FINISHED = ("succeeded", "failed", "cancelled")
SCRAPE_INTERVAL_S = 2.0
LISTING_INTERVAL_S = 20.0


def _retrying() -> httpx.HTTPTransport:
    # Short keep-alive on our side: the watch loop idles between scrapes, and uvicorn closes idle
    # connections after 5 s; a request must never race that close. (A transport's own limits are the
    # ones that apply: httpx ignores the client's when a transport is given.)
    return httpx.HTTPTransport(retries=3, limits=httpx.Limits(keepalive_expiry=1.0))


def scrape(http: httpx.Client) -> dict[str, float]:
    """Queue depth and jobs per status from ``/metrics`` (as a Prometheus server would read them)."""
    text = http.get("/metrics").text
    values: dict[str, float] = {}
    for match in METRIC_RE.finditer(text):
        values[match.group(2) or "queue_depth"] = float(match.group(3))
    values["has_duration_histogram"] = float("vitq_job_duration_seconds_bucket" in text)
    values["has_wait_histogram"] = float("vitq_job_queue_wait_seconds_bucket" in text)
    return values


def _all_jobs(http: httpx.Client, ids: set[str]) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 200, **({"cursor": cursor} if cursor else {})}
        body = http.get("/v1/jobs", params=params).raise_for_status().json()
        jobs.extend(j for j in body["data"] if j["id"] in ids)
        cursor = body.get("next_cursor")
        if not cursor:
            return jobs


def max_displacement(jobs: list[dict[str, Any]]) -> int:
    """How many places any started job moved between submission order and start order."""
    started = [j for j in jobs if j.get("started_at")]
    by_submit = sorted(started, key=lambda j: j["id"])
    start_rank = {j["id"]: r for r, j in enumerate(sorted(started, key=lambda j: (j["started_at"], j["id"])))}
    return max((abs(start_rank[j["id"]] - r) for r, j in enumerate(by_submit)), default=0)


def run_drain(url: str, api_key: str, *, jobs: int, timeout_s: float, workers: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60, transport=_retrying()) as http:
        t0 = time.monotonic()
        ids: list[str] = []
        for _ in range(jobs):
            response = http.post("/v1/jobs", json=SMOKE_JOB)
            response.raise_for_status()
            ids.append(response.json()["id"])
        submit_s = time.monotonic() - t0
        timeline: list[dict[str, float]] = []
        deadline = time.monotonic() + timeout_s
        finished_seen = 0
        next_listing = 0.0
        while True:
            # /metrics every 2 s is what a Prometheus server does; listing every job is the watcher's own
            # load on the API (which shares the cores with the workers), so it happens every 20 s and
            # again only once the metrics say the queue is empty.
            sample = scrape(http)
            now = time.monotonic()
            queue_empty = sample.get("queue_depth", 1) == 0 and sample.get("running", 1) == 0
            if now >= next_listing or queue_empty:
                rows = _all_jobs(http, set(ids))
                finished_seen = sum(1 for j in rows if j["status"] in FINISHED)
                next_listing = now + LISTING_INTERVAL_S
            sample["t"] = now - t0
            sample["mine_finished"] = float(finished_seen)
            timeline.append(sample)
            if finished_seen == jobs or now > deadline:
                break
            time.sleep(SCRAPE_INTERVAL_S)
        drain_s = time.monotonic() - t0 - submit_s
        if finished_seen != jobs:  # stopped by the deadline: the last listing may be 20 s old
            rows = _all_jobs(http, set(ids))
    statuses = Counter(j["status"] for j in rows)
    durations = [_seconds(j["started_at"], j["finished_at"]) for j in rows if j.get("finished_at") and j["started_at"]]
    waits = [_seconds(j["created_at"], j["started_at"]) for j in rows if j.get("started_at")]
    displacement = max_displacement(rows)
    finished = sum(statuses[s] for s in FINISHED)
    report = {
        "url": url,
        "jobs": jobs,
        "workers": workers,
        "submit_seconds": submit_s,
        "submit_rps": jobs / submit_s if submit_s else 0.0,
        "drain_seconds": drain_s,
        "finished": finished,
        "statuses": dict(statuses),
        "jobs_per_second": finished / drain_s if drain_s else 0.0,
        "job_seconds_p50": percentile(durations, 50),
        "job_seconds_p99": percentile(durations, 99),
        "queue_wait_seconds_max": max(waits, default=0.0),
        "max_order_displacement": displacement,
        "in_order": displacement <= max(1, workers - 1),
        "metrics_seen": {
            "queue_depth_max": max((s.get("queue_depth", 0) for s in timeline), default=0),
            "duration_histogram": bool(timeline and timeline[-1]["has_duration_histogram"]),
            "queue_wait_histogram": bool(timeline and timeline[-1]["has_wait_histogram"]),
        },
        "timeline": timeline,
        "all_drained": finished == jobs,
    }
    metrics_ok = report["metrics_seen"]["duration_histogram"]
    report["ok"] = report["in_order"] and statuses.get("failed", 0) == 0 and metrics_ok
    return report


def _seconds(start: str, end: str) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def format_drain(report: dict[str, Any]) -> str:
    m = report["metrics_seen"]
    return "\n".join(
        [
            f"submitted {report['jobs']} jobs in {report['submit_seconds']:.1f} s ({report['submit_rps']:.0f}/s)",
            f"{report['finished']}/{report['jobs']} finished in {report['drain_seconds']:.1f} s with "
            f"{report['workers']} workers ({report['jobs_per_second']:.2f} jobs/s); statuses {report['statuses']}",
            f"job duration p50 {report['job_seconds_p50']:.2f} s, p99 {report['job_seconds_p99']:.2f} s; "
            f"longest queue wait {report['queue_wait_seconds_max']:.1f} s",
            f"order: max displacement {report['max_order_displacement']} "
            f"({'in order' if report['in_order'] else 'OUT OF ORDER'})",
            f"/metrics: vitq_queue_depth peaked at {m['queue_depth_max']:.0f}; "
            f"vitq_job_duration_seconds {'present' if m['duration_histogram'] else 'MISSING'}; "
            f"vitq_job_queue_wait_seconds {'present' if m['queue_wait_histogram'] else 'MISSING'}",
        ]
    )
