"""Prometheus metrics: HTTP latency (middleware), and job gauges/histogram read from the database
at scrape time, so they are right whichever process (API or worker) changed a job.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.persistence.db import session_factory
from api.persistence.tables import Job, JobStatus

DURATION_BUCKETS = (0.25, 0.5, 1, 2.5, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)


class JobCollector(Collector):
    def __init__(self, database_url: str) -> None:
        self.database_url = database_url

    def collect(self) -> Iterator:
        by_status = GaugeMetricFamily("vitq_jobs", "Jobs by status", labels=["status"])
        queue = GaugeMetricFamily("vitq_queue_depth", "Jobs queued and not yet claimed by a worker")
        duration = HistogramMetricFamily(
            "vitq_job_duration_seconds", "Wall time of finished jobs, start to end", labels=["status"]
        )
        wait = HistogramMetricFamily(
            "vitq_job_queue_wait_seconds", "Time from submission to a worker starting the job (last start)"
        )
        with session_factory(self.database_url)() as session:
            counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            finished = session.execute(
                select(Job.status, Job.started_at, Job.finished_at).where(
                    Job.started_at.is_not(None), Job.finished_at.is_not(None)
                )
            ).all()
            claimed = session.execute(
                select(Job.created_at, Job.started_at).where(Job.started_at.is_not(None))
            ).all()
        for status in JobStatus:
            by_status.add_metric([status.value], counts.get(status.value, 0))
        queue.add_metric([], counts.get(JobStatus.QUEUED.value, 0))
        per_status: dict[str, list[float]] = {}
        for status, started, ended in finished:
            per_status.setdefault(status, []).append(max(0.0, (ended - started).total_seconds()))
        for status, values in sorted(per_status.items()):
            duration.add_metric([status], _buckets(values), sum(values))
        waits = [max(0.0, (s - c).total_seconds()) for c, s in claimed]
        wait.add_metric([], _buckets(waits), sum(waits))
        yield by_status
        yield queue
        yield duration
        yield wait


def _buckets(values: list[float]) -> list[tuple[str, int]]:
    """Cumulative Prometheus buckets over ``DURATION_BUCKETS`` (one sorted pass)."""
    ordered = sorted(values)
    out, i = [], 0
    for bound in DURATION_BUCKETS:
        while i < len(ordered) and ordered[i] <= bound:
            i += 1
        out.append((str(bound), i))
    out.append(("+Inf", len(ordered)))
    return out


def make_registry(database_url: str) -> tuple[CollectorRegistry, Histogram]:
    """With several API processes (``vitq api --workers N``) each one records latency into
    ``PROMETHEUS_MULTIPROC_DIR`` and a scrape of any of them sums all, instead of showing one
    process's share at random."""
    registry = CollectorRegistry()
    registry.register(JobCollector(database_url))
    shared = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    if shared:
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    latency = Histogram(
        "vitq_http_request_duration_seconds",
        "HTTP request latency",
        ["method", "route", "status"],
        registry=None if shared else registry,
    )
    return registry, latency


class LatencyMiddleware:
    """Records latency per route template (not per raw path, which would explode label cardinality)."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.histogram.labels(scope["method"], template, str(status["code"])).observe(
                time.perf_counter() - start
            )
