"""Prometheus metrics: HTTP latency (middleware), and job gauges/histogram read from the database
at scrape time, so they are right whichever process (API or worker) changed a job.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.persistence.db import session_factory
from api.persistence.tables import Job, JobStatus

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)


class JobCollector(Collector):
    def __init__(self, database_url: str) -> None:
        self.database_url = database_url

    def collect(self) -> Iterator:
        by_status = GaugeMetricFamily("vitq_jobs", "Jobs by status", labels=["status"])
        queue = GaugeMetricFamily("vitq_queue_depth", "Jobs queued and not yet claimed by a worker")
        duration = HistogramMetricFamily(
            "vitq_job_duration_seconds", "Wall time of finished jobs, start to end", labels=["status"]
        )
        with session_factory(self.database_url)() as session:
            counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            finished = session.execute(
                select(Job.status, Job.started_at, Job.finished_at).where(
                    Job.started_at.is_not(None), Job.finished_at.is_not(None)
                )
            ).all()
        for status in JobStatus:
            by_status.add_metric([status.value], counts.get(status.value, 0))
        queue.add_metric([], counts.get(JobStatus.QUEUED.value, 0))
        per_status: dict[str, list[float]] = {}
        for status, started, ended in finished:
            per_status.setdefault(status, []).append(max(0.0, (ended - started).total_seconds()))
        for status, values in sorted(per_status.items()):
            buckets = [(str(b), sum(1 for v in values if v <= b)) for b in DURATION_BUCKETS]
            buckets.append(("+Inf", len(values)))
            duration.add_metric([status], buckets, sum(values))
        yield by_status
        yield queue
        yield duration


def make_registry(database_url: str) -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    registry.register(JobCollector(database_url))
    latency = Histogram(
        "vitq_http_request_duration_seconds",
        "HTTP request latency",
        ["method", "route", "status"],
        registry=registry,
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
