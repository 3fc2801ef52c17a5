"""Prometheus metrics: HTTP latency (middleware), and job gauges/histogram read from the database
at scrape time, so they are right whichever process (API or worker) changed a job.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, case, func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.db import session_factory
from service.tables import Job, JobStatus

DURATION_BUCKETS = (0.25, 0.5, 1, 2.5, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)


class JobCollector(Collector):
    """Job gauges and histograms, aggregated by the database at scrape time.

    Why in SQL: the histograms cover every job ever run; fetching each row into Python made a scrape
    grow with the table (the 1,000-job drain scraped all of them every 2 s). One grouped query with a
    count per bucket returns a few rows whatever the table holds.
    """

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
            dialect = session.get_bind().dialect.name
            counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            run_s = _seconds(dialect, Job.started_at, Job.finished_at)
            finished = session.execute(
                select(Job.status, *_histogram_columns(run_s))
                .where(Job.started_at.is_not(None), Job.finished_at.is_not(None))
                .group_by(Job.status)
            ).all()
            wait_s = _seconds(dialect, Job.created_at, Job.started_at)
            claimed = session.execute(
                select(*_histogram_columns(wait_s)).where(Job.started_at.is_not(None))
            ).one()
        for status in JobStatus:
            by_status.add_metric([status.value], counts.get(status.value, 0))
        queue.add_metric([], counts.get(JobStatus.QUEUED.value, 0))
        for status, *row in sorted(finished, key=lambda r: r[0]):
            duration.add_metric([status], *_buckets(row))
        wait.add_metric([], *_buckets(claimed))
        yield by_status
        yield queue
        yield duration
        yield wait


def _seconds(dialect: str, start: ColumnElement, end: ColumnElement) -> ColumnElement:
    """``end - start`` in seconds, never negative (clocks of different hosts may disagree a little)."""
    if dialect == "postgresql":
        return func.greatest(func.extract("epoch", end - start), 0.0)
    # SQLite: julian days carry ~50 µs of float noise at today's dates; whole milliseconds keep a job of
    # exactly 0.5 s in the 0.5 bucket
    return func.max(func.round((func.julianday(end) - func.julianday(start)) * 86400.0, 3), 0.0)


def _histogram_columns(seconds: ColumnElement) -> list[ColumnElement]:
    """count, sum, then one cumulative count per bound of ``DURATION_BUCKETS``."""
    return [
        func.count(),
        func.coalesce(func.sum(seconds), 0.0),
        *(func.coalesce(func.sum(case((seconds <= bound, 1), else_=0)), 0) for bound in DURATION_BUCKETS),
    ]


def _buckets(row: Sequence[Any]) -> tuple[list[tuple[str, int]], float]:
    """Prometheus buckets (cumulative, ending in +Inf) and the sum, from a ``_histogram_columns`` row."""
    count, total, *cumulative = row
    bounds = [(str(bound), int(n)) for bound, n in zip(DURATION_BUCKETS, cumulative, strict=True)]
    return [*bounds, ("+Inf", int(count))], float(total)


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
