"""The job histograms in /metrics are aggregated by the database; they must equal the per-row figures
on both databases the service runs on, for any table contents."""

from __future__ import annotations

import secrets
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client.core import HistogramMetricFamily
from sqlalchemy import select

from api.metrics import DURATION_BUCKETS, JobCollector
from service.db import session_scope
from service.keys import create_key
from service.tables import Job, utcnow

RUN_SECONDS = [0.1, 0.5, 3.0, 61.0, 100.0, 5000.0, 20000.0, -2.0]
"""Spread over the buckets, past the last bound, and one negative (a worker clock behind the API's)."""


def _add_jobs(database_url: str) -> None:
    with session_scope(database_url) as session:
        tenant_id = create_key(session, tenant_name=f"metrics-{secrets.token_hex(4)}").tenant_id
        created = utcnow() - timedelta(hours=10)
        for i, seconds in enumerate(RUN_SECONDS):
            started = created + timedelta(seconds=7 * i)
            session.add(Job(
                id=f"job_m{secrets.token_hex(6)}", tenant_id=tenant_id, status="succeeded" if i % 2 else "failed",
                request={}, model_key="m", model_spec={}, config={}, calibration="c", request_hash="h",
                created_at=created, started_at=started, finished_at=started + timedelta(seconds=seconds),
            ))
        session.add(Job(id=f"job_m{secrets.token_hex(6)}", tenant_id=tenant_id, status="queued", request={},
                        model_key="m", model_spec={}, config={}, calibration="c", request_hash="h"))


def _expected(values: list[float]) -> tuple[list[tuple[str, int]], float]:
    values = [max(0.0, v) for v in values]
    buckets = [(str(b), sum(1 for v in values if v <= b)) for b in DURATION_BUCKETS]
    return [*buckets, ("+Inf", len(values))], sum(values)


def _samples(family: HistogramMetricFamily, labels: dict[str, str]) -> tuple[list[tuple[str, int]], float]:
    buckets = [(s.labels["le"], int(s.value)) for s in family.samples
               if s.name.endswith("_bucket") and {k: s.labels[k] for k in labels} == labels]
    total = next(s.value for s in family.samples if s.name.endswith("_sum") and
                 {k: s.labels[k] for k in labels} == labels)
    return buckets, total


def _check(database_url: str) -> None:
    _add_jobs(database_url)
    families = {f.name: f for f in JobCollector(database_url).collect()}
    with session_scope(database_url) as session:
        rows = session.execute(select(Job.status, Job.created_at, Job.started_at, Job.finished_at)).all()
    for status in {r.status for r in rows if r.finished_at and r.started_at}:
        runs = [(r.finished_at - r.started_at).total_seconds() for r in rows
                if r.status == status and r.finished_at and r.started_at]
        got_buckets, got_sum = _samples(families["vitq_job_duration_seconds"], {"status": status})
        want_buckets, want_sum = _expected(runs)
        assert got_buckets == want_buckets, status
        assert got_sum == pytest.approx(want_sum, rel=1e-6, abs=1e-3)
    waits = [(r.started_at - r.created_at).total_seconds() for r in rows if r.started_at]
    got_buckets, got_sum = _samples(families["vitq_job_queue_wait_seconds"], {})
    want_buckets, want_sum = _expected(waits)
    assert got_buckets == want_buckets and got_sum == pytest.approx(want_sum, rel=1e-6, abs=1e-3)
    assert any(s.value >= 1 for s in families["vitq_queue_depth"].samples)


def test_histograms_aggregated_by_postgresql_equal_the_per_row_figures(migrated_pg: str):
    _check(migrated_pg)


def test_histograms_aggregated_by_sqlite_equal_the_per_row_figures(tmp_path: Path):
    import migrations

    url = f"sqlite:///{tmp_path / 'vitq.db'}"
    migrations.upgrade(url)
    _check(url)
