"""Faults of the workers, through real processes (`vitq api` + `vitq worker` on PostgreSQL and Redis):
a worker SIGKILLed in stage 1, two workers and a message delivered twice, a job past its time limit.
Each test asserts the job's final state and that nothing ran twice or went missing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from loadtest.load import SMOKE_JOB
from service.queue import RUN_JOB, celery_for
from tests.helpers import wait_for
from tests.helpers.fault_stack import FAST_JOB, FOREVER_JOB, isvit_job, stack_factory  # noqa: F401

pytestmark = pytest.mark.slow


def test_worker_killed_in_stage1_is_rerun_then_failed_at_the_attempt_limit(stack_factory):  # noqa: F811
    stack = stack_factory(stale_after_s="3", reaper_interval_s="1", max_attempts="3")
    stack.start_api()
    stack.start_worker("worker1")
    client = stack.client()
    job = client.submit_job(**isvit_job(8))["id"]
    stack.wait_stage(job, "stage1")
    stack.kill("worker1")
    assert stack.row(job).status == "running"  # nobody is left to say otherwise

    # a restarted worker: its reaper sees the heartbeat stopped, re-queues, and the job runs again
    stack.start_worker("worker2")
    done = stack.wait_finished(job, timeout=240)
    assert done.status == "succeeded" and done.attempts == 2, (done.status, done.error_message)
    kinds = [kind for kind, _ in stack.events(job)]
    assert kinds.count("started") == 2 and kinds.count("requeued") == 1 and kinds.count("succeeded") == 1
    assert stack.outputs(job) == (4, 1)  # one set of artifacts, one report: stored once

    # the same fault with the attempt limit reached: failed with the reason, not re-run, not `running`
    doomed = client.submit_job(**FOREVER_JOB)["id"]
    stack.wait_stage(doomed, "stage1")
    stack.kill("worker2")
    stack.start_worker("worker3", max_attempts="1")
    failed = stack.wait_finished(doomed, timeout=60)
    assert failed.status == "failed" and failed.error_code == "worker_lost", failed.status
    assert "giving up after 1 attempts" in failed.error_message
    assert failed.attempts == 1 and stack.outputs(doomed) == (0, 0)
    public = client.get_job(doomed)
    assert public["status"] == "failed" and public["error"]["code"] == "worker_lost"


def test_two_workers_and_a_twice_delivered_message_run_the_job_once(stack_factory):  # noqa: F811
    stack = stack_factory(torch_threads="1")  # two workers on one host: one core each
    stack.start_api()
    first = stack.start_worker("worker1")
    second = stack.start_worker("worker2")
    client = stack.client()
    job = client.submit_job(**FAST_JOB)["id"]
    # the broker delivers the job twice more, under one task id (as a redelivery would)
    app = celery_for(_settings(stack))
    for _ in range(2):
        app.send_task(RUN_JOB, args=[job], queue=stack.env["VITQ_QUEUE"], task_id=f"dup-{job}")

    done = stack.wait_finished(job, timeout=180)
    assert done.status == "succeeded" and done.attempts == 1

    def deliveries() -> int:
        return sum(_handled(stack.log(name)) for name in ("worker1", "worker2"))

    wait_for(lambda: deliveries() == 3, timeout=60, what="all three deliveries to be handled")
    refused = sum(_log(stack.log(n)).count(f"job {job} not claimable") for n in ("worker1", "worker2"))
    assert refused == 2  # the claim (compare-and-set on the row) turned the two extra deliveries away
    assert all(_handled(stack.log(n)) for n in ("worker1", "worker2")), "both workers got a delivery"
    kinds = [kind for kind, _ in stack.events(job)]
    assert kinds.count("started") == 1 and kinds.count("succeeded") == 1
    assert stack.outputs(job) == (4, 1)
    assert first.poll() is None and second.poll() is None
    report = client.download_artifact(job, "report.json", stack.data_dir / "report.json")
    assert json.loads(report.read_text())["threads"] == 1  # the pool child took its share, not every core


def test_time_limit_fails_the_job_frees_memory_and_the_worker_takes_the_next(stack_factory):  # noqa: F811
    # 60 s: past the FAST job (10 s idle, over 40 s measured on 2 cores shared at load 8)
    stack = stack_factory(job_soft_time_limit_s="60", job_time_limit_s="180")
    stack.start_api()
    stack.start_worker()
    client = stack.client()
    slow = client.submit_job(**FOREVER_JOB)["id"]
    wait_for(lambda: stack.row(slow).worker is not None, timeout=60, what="the slow job claimed")
    child = int(stack.row(slow).worker.split(":")[1].split("/")[0])
    peak = 0.0
    while stack.row(slow).status == "running":  # the job's memory at its largest, sampled as it runs
        peak = max(peak, _rss_mb(child))
        time.sleep(0.5)
    timed_out = stack.wait_finished(slow, timeout=10)
    assert timed_out.status == "failed" and timed_out.error_code == "timeout", timed_out.error_message
    assert "time limit of 60 s" in timed_out.error_message and timed_out.attempts == 1
    after = _rss_mb(child)

    nxt = client.submit_job(**FAST_JOB)["id"]
    done = stack.wait_finished(nxt, timeout=180)
    assert done.status == "succeeded" and done.worker == timed_out.worker  # the same pool process
    assert stack.outputs(slow) == (0, 0) and stack.outputs(nxt) == (4, 1)
    print(f"pool child RSS: {peak:.0f} MB at most while running, {after:.0f} MB after the timeout")
    assert after < peak, (peak, after)


def test_hard_time_limit_kills_a_frozen_pool_process_the_reaper_fails_the_job_and_the_worker_goes_on(
    stack_factory,  # noqa: F811
):
    """A job stuck where the soft limit's exception cannot reach it (here: the pool process frozen with
    SIGSTOP, as in uninterruptible I/O or a hung driver call) is SIGKILLed by Celery's hard limit, so it
    cannot record its own end. The reaper must fail it with ``timeout``, not run it again into the same
    limit, and the worker must go on with a fresh pool process."""
    stack = stack_factory(job_soft_time_limit_s="10", job_time_limit_s="15", stale_after_s="20",
                          reaper_interval_s="1")
    stack.start_api()
    worker = stack.start_worker()
    client = stack.client()
    stuck = client.submit_job(**FOREVER_JOB)["id"]
    wait_for(lambda: stack.row(stuck).worker is not None, timeout=60, what="the job claimed")
    frozen = stack.row(stuck).worker  # frozen as soon as claimed: well inside the 10 s soft limit
    os.kill(int(frozen.split(":")[1].split("/")[0]), signal.SIGSTOP)

    failed = stack.wait_finished(stuck, timeout=90)
    assert failed.status == "failed" and failed.error_code == "timeout", (failed.status, failed.error_message)
    assert failed.error_message == "the job ran past the time limit of 10 s" and failed.attempts == 1
    assert stack.outputs(stuck) == (0, 0)
    log = _log(stack.log("worker"))
    assert "Hard time limit (15s) exceeded" in log and "signal 9 (SIGKILL)" in log, log[-3000:]
    kinds = [kind for kind, _ in stack.events(stuck)]
    assert kinds.count("started") == 1 and "requeued" not in kinds  # not run again into the same limit

    nxt = client.submit_job(**SMOKE_JOB)["id"]
    done = stack.wait_finished(nxt, timeout=60)
    assert done.status == "succeeded", done.error_message
    assert done.worker != frozen and worker.poll() is None  # a new pool process of the same worker
    print(f"hard limit: pool process {frozen} killed; the next job ran in {done.worker}")


def _settings(stack):  # noqa: ANN001, ANN202
    from service.settings import Settings

    return Settings(
        data_dir=stack.data_dir,
        database_url=stack.database_url,
        broker_url=stack.env["VITQ_BROKER_URL"],
        queue=stack.env["VITQ_QUEUE"],
    )


def _log(path: Path) -> str:
    return path.read_text(errors="replace")


def _handled(path: Path) -> int:
    """How many ``run_job`` deliveries this worker finished (its queue only ever carries this job)."""
    return len(re.findall(rf"Task {re.escape(RUN_JOB)}\[[^\]]+\] succeeded in", _log(path)))


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_reaper_fails_a_job_killed_by_the_hard_time_limit_as_timeout(service):
    """Celery's hard limit kills the pool process, so the job cannot record its own timeout; the reaper
    must not re-run it (it would hit the same limit) but fail it with ``timeout``."""
    from datetime import timedelta

    from sqlalchemy import update

    from service.db import session_scope
    from service.tables import Job, utcnow
    from tests.helpers.factories import auth
    from worker.reaper import reap_stale_jobs
    from worker.runner import claim

    settings = service.settings
    response = service.client.post("/v1/jobs", json=FAST_JOB, headers=auth(service.key_a))
    job = response.json()["id"]
    assert claim(settings, job, "killed-by-hard-limit")
    long_ago = utcnow() - timedelta(seconds=settings.job_soft_time_limit_s + 60)
    with session_scope(settings.resolved_database_url) as session:
        session.execute(update(Job).where(Job.id == job).values(started_at=long_ago, heartbeat_at=long_ago))
    sent: list[str] = []
    assert job in reap_stale_jobs(settings, sent.append)["ended"] and sent == []
    body = service.client.get(f"/v1/jobs/{job}", headers=auth(service.key_a)).json()
    assert body["status"] == "failed" and body["error"]["code"] == "timeout"
