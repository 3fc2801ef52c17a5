"""service/lifecycle.py against the real PostgreSQL: every transition is a compare-and-set on status and
attempt, so a worker whose attempt was re-queued, taken over or cancelled while it was finishing loses
every later transition and records no artifacts. Tested by calling the transitions in the losing order,
through the runner, and with two real processes racing over the same rows.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from core import QuantConfig
from service import lifecycle
from service.db import session_scope
from service.keys import create_key
from service.tables import Artifact, Job, JobEvent, JobStatus, Report, new_id, utcnow
from tests.helpers import REPO

STALE_S = 60


@pytest.fixture(scope="module")
def tenant_id(migrated_pg: str) -> str:
    with session_scope(migrated_pg) as session:
        return create_key(session, tenant_name=f"lifecycle-{secrets.token_hex(3)}").tenant_id


def _new_job(url: str, tenant_id: str) -> str:
    job = Job(
        id=new_id("job"),
        tenant_id=tenant_id,
        request={},
        model_key="fmnist-vit-tiny",
        model_spec={},
        config=QuantConfig(w_bits=4, a_bits=4, preset="smoke").resolved().to_dict(),
        calibration="fashion-mnist:train:32",
        request_hash="0" * 64,
    )
    with session_scope(url) as session:
        lifecycle.create(session, job, queue="test")
    return job.id


def _claim(url: str, job_id: str, worker: str) -> lifecycle.Lease | None:
    with session_scope(url) as session:
        return lifecycle.claim(
            session, job_id=job_id, worker=worker, max_attempts=3, stale_before=utcnow() - timedelta(seconds=STALE_S)
        )


def _heartbeat_stops(url: str, job_id: str) -> None:
    """What a worker that froze looks like: its heartbeat is older than the stale limit (test-only write)."""
    with session_scope(url) as session:
        old = utcnow() - timedelta(seconds=STALE_S + 5)
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=old))


def _results(job_id: str, tenant_id: str) -> tuple[list[Artifact], Report]:
    names = ("checkpoint.safetensors", "report.json", "report.html")
    artifacts = [
        Artifact(job_id=job_id, name=n, sha256=secrets.token_hex(32), size_bytes=1, content_type="x") for n in names
    ]
    report = Report(
        job_id=job_id, tenant_id=tenant_id, model_key="m", w_bits=4, a_bits=4, method="isvit", preset="smoke", report={}
    )
    return artifacts, report


def _succeed(url: str, lease: lifecycle.Lease, tenant_id: str) -> bool:
    artifacts, report = _results(lease.job_id, tenant_id)
    with session_scope(url) as session:
        return lifecycle.succeed(
            session, lease, summary={"by": lease.worker}, progress=None, artifacts=artifacts, report=report
        )


def _row(url: str, job_id: str) -> tuple[Job, int, int]:
    with session_scope(url) as session:
        job = session.get(Job, job_id)
        session.expunge(job)
        artifacts = session.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id))
        reports = session.scalar(select(func.count()).select_from(Report).where(Report.job_id == job_id))
    return job, artifacts, reports


def test_requeued_worker_loses_every_transition_and_stores_nothing(migrated_pg, tenant_id):
    """Worker 1 froze, the reaper re-queued its job, worker 2 took it; then worker 1 wakes up and
    tries to finish. Every one of its transitions loses; worker 2's win."""
    url = migrated_pg
    job_id = _new_job(url, tenant_id)
    first = _claim(url, job_id, "worker-1")
    assert first is not None and first.attempt == 1
    assert _claim(url, job_id, "worker-2") is None  # heartbeat fresh: not claimable
    _heartbeat_stops(url, job_id)
    with session_scope(url) as session:
        assert lifecycle.requeue(session, job_id=job_id, attempt=1, stale_before=utcnow() - timedelta(seconds=STALE_S))
    second = _claim(url, job_id, "worker-2")
    assert second is not None and second.attempt == 2

    with session_scope(url) as session:
        assert not lifecycle.heartbeat(session, first)
        assert not lifecycle.record_progress(session, first, {"stage": "stale"}, new_stage="stale")
        assert not lifecycle.fail(session, first, code="internal", message="late failure")
        assert not lifecycle.timeout(session, first, limit_s=1)
        assert not lifecycle.cancelled(session, first)
    assert not _succeed(url, first, tenant_id)
    job, artifacts, reports = _row(url, job_id)
    assert (job.status, job.worker, job.attempts, job.progress) == ("running", "worker-2", 2, None)
    assert (artifacts, reports) == (0, 0)

    with session_scope(url) as session:
        assert lifecycle.heartbeat(session, second)
    assert _succeed(url, second, tenant_id)
    assert not _succeed(url, second, tenant_id)  # a second success of the same attempt loses too
    assert not _succeed(url, first, tenant_id)
    job, artifacts, reports = _row(url, job_id)
    assert (job.status, job.result, job.attempts) == ("succeeded", {"by": "worker-2"}, 2)
    assert (artifacts, reports) == (3, 1)


def test_same_worker_name_with_an_old_attempt_loses(migrated_pg, tenant_id):
    """The guard is the attempt, not only the worker's name: a restarted process with the same
    hostname:pid that re-claimed the job does not let the old attempt finish."""
    url = migrated_pg
    job_id = _new_job(url, tenant_id)
    old = _claim(url, job_id, "host:1")
    _heartbeat_stops(url, job_id)
    new = _claim(url, job_id, "host:1")  # a stale running job taken over, by the same name
    assert old is not None and new is not None and (old.attempt, new.attempt) == (1, 2)
    assert not _succeed(url, old, tenant_id)
    assert _succeed(url, new, tenant_id)
    assert _row(url, job_id)[1] == 3


def test_job_cancelled_by_the_reaper_while_finishing_is_not_overwritten(migrated_pg, tenant_id):
    url = migrated_pg
    job_id = _new_job(url, tenant_id)
    lease = _claim(url, job_id, "worker-1")
    with session_scope(url) as session:
        assert lifecycle.request_cancel(session, job_id=job_id, attempt=1)
    _heartbeat_stops(url, job_id)
    with session_scope(url) as session:
        assert lifecycle.end_abandoned(
            session,
            job_id=job_id,
            attempt=1,
            stale_before=utcnow() - timedelta(seconds=STALE_S),
            status=JobStatus.CANCELLED,
            code=lifecycle.JobErrorCode.CANCELLED,
            event="cancelled",
            message="cancelled (its worker stopped responding)",
        )
    assert not _succeed(url, lease, tenant_id)
    job, artifacts, _ = _row(url, job_id)
    assert job.status == "cancelled" and artifacts == 0
    with session_scope(url) as session:  # a finished job cannot be cancelled, re-queued or claimed
        assert not lifecycle.request_cancel(session, job_id=job_id, attempt=1)
        assert not lifecycle.cancel_queued(session, job_id=job_id, attempt=1)
        assert not lifecycle.requeue(session, job_id=job_id, attempt=1, stale_before=utcnow())
    assert _claim(url, job_id, "worker-2") is None


def test_cancel_of_a_queued_job_and_a_claim_cannot_both_win(migrated_pg, tenant_id):
    url = migrated_pg
    job_id = _new_job(url, tenant_id)
    with session_scope(url) as session:
        assert lifecycle.cancel_queued(session, job_id=job_id, attempt=0)
    assert _claim(url, job_id, "worker-1") is None
    other = _new_job(url, tenant_id)
    assert _claim(url, other, "worker-1") is not None
    with session_scope(url) as session:  # the API read "queued", the worker claimed it meanwhile
        assert not lifecycle.cancel_queued(session, job_id=other, attempt=0)
        kinds = session.scalars(select(JobEvent.kind).where(JobEvent.job_id == other).order_by(JobEvent.id)).all()
    assert kinds == ["created", "started"]


def test_runner_drops_its_results_when_the_job_was_taken_while_it_finished(service, monkeypatch):
    """Through ``worker.runner.run_job``: core finishes, but meanwhile the reaper re-queued the job and
    another worker claimed it. The runner's success loses: no artifacts, the row stays the other's."""
    import worker.runner as runner

    settings = service.settings
    url = settings.resolved_database_url
    tenant = service.client.get("/v1/tenant", headers={"Authorization": f"Bearer {service.key_a}"}).json()["id"]
    job_id = _new_job(url, tenant)
    taken: dict[str, lifecycle.Lease | None] = {}

    def finishes_after_a_takeover(spec, config, *, out_dir: Path, **_kwargs):  # noqa: ANN001
        out_dir.mkdir(parents=True)
        (out_dir / "checkpoint.safetensors").write_bytes(b"weights")
        report = {"w_bits": 4, "a_bits": 4, "method": "isvit", "preset": "smoke", "fp": None, "quant": {}}
        (out_dir / "report.json").write_text(json.dumps(report))
        _heartbeat_stops(url, job_id)  # this worker froze for longer than the stale limit...
        with session_scope(url) as session:  # ...so the reaper re-queued its job and worker 2 took it
            lifecycle.requeue(session, job_id=job_id, attempt=1, stale_before=utcnow())
        taken["lease"] = _claim(url, job_id, "worker-2")
        return report

    monkeypatch.setattr(runner, "spec_from_stored", lambda *a, **k: {})
    monkeypatch.setattr(runner, "data_path", lambda *a, **k: Path("unused"))
    monkeypatch.setattr(runner, "run_quantization", finishes_after_a_takeover)
    assert runner.run_job(settings, job_id) is None
    assert taken["lease"] is not None
    job, artifacts, reports = _row(url, job_id)
    assert (job.status, job.worker, job.attempts, artifacts, reports) == ("running", "worker-2", 2, 0, 0)


RACER = r"""
import json, sys
from datetime import timedelta
from core import QuantConfig
from service import lifecycle
from service.db import session_scope
from service.tables import Artifact, Report, utcnow

from sqlalchemy import text

role, url, tenant, *jobs = sys.argv[1:]
won = []
with session_scope(url) as session:  # connected before the start, so both begin together
    session.execute(text("SELECT 1"))
print("ready", flush=True)
sys.stdin.readline()  # the parent says go to both at once
for job_id in jobs if role == "finisher" else reversed(jobs):  # they meet somewhere in the middle
    with session_scope(url) as session:
        if role == "finisher":
            lease = lifecycle.Lease(job_id=job_id, worker="worker-1", attempt=1)
            artifacts = [Artifact(job_id=job_id, name=n, sha256="0" * 64, size_bytes=1, content_type="x")
                         for n in ("checkpoint.safetensors", "report.json", "report.html")]
            report = Report(job_id=job_id, tenant_id=tenant, model_key="m", w_bits=4, a_bits=4, method="isvit",
                            preset="smoke", report={})
            ok = lifecycle.succeed(session, lease, summary={}, progress=None, artifacts=artifacts, report=report)
        else:
            ok = lifecycle.requeue(session, job_id=job_id, attempt=1, stale_before=utcnow() - timedelta(seconds=60))
    if ok and role == "reaper":
        with session_scope(url) as session:
            assert lifecycle.claim(session, job_id=job_id, worker="worker-2", max_attempts=3,
                                   stale_before=utcnow() - timedelta(seconds=60)) is not None
    if ok:
        won.append(job_id)
print(json.dumps(won))
"""


def test_finishing_worker_and_reaper_race_in_real_processes(migrated_pg, tenant_id):
    """Two processes over the same 40 frozen-looking jobs at once, from opposite ends: one finishes each
    job as worker 1, the other re-queues it and claims it as worker 2. For every job exactly one of them wins, and the
    row and its artifacts say which: never a succeeded job owned by worker 2, never a second set."""
    url = migrated_pg
    jobs = [_new_job(url, tenant_id) for _ in range(40)]
    for job_id in jobs:
        assert _claim(url, job_id, "worker-1") is not None
        _heartbeat_stops(url, job_id)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, role, url, tenant_id, *jobs],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for role in ("finisher", "reaper")
    ]
    for proc in procs:  # both imported and connected
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-2000:]
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-2000:]
    finished, requeued = (set(json.loads(out)) for out, _ in outputs)
    assert finished.isdisjoint(requeued) and finished | requeued == set(jobs)
    print(f"finisher won {len(finished)}, reaper won {len(requeued)} of {len(jobs)}")
    for job_id in jobs:
        job, artifacts, reports = _row(url, job_id)
        if job_id in finished:
            assert (job.status, job.worker, job.attempts, artifacts, reports) == ("succeeded", "worker-1", 1, 3, 1)
        else:
            assert (job.status, job.worker, job.attempts, artifacts, reports) == ("running", "worker-2", 2, 0, 0)
