"""Outages of the service's dependencies, through real processes: Redis restarted (without persistence)
while jobs are queued and one is running, and PostgreSQL restarted under API traffic.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from service.settings import Settings
from tests.helpers import wait_for
from tests.helpers.factories import auth
from tests.helpers.fault_stack import FAST_JOB, isvit_job, stack_factory  # noqa: F401
from tests.helpers.outage_servers import private_redis, system_postgres  # noqa: F401
from worker.broker_inventory import pending_job_ids

pytestmark = pytest.mark.slow


def test_redis_restart_loses_no_job_the_reaper_resends_from_the_database(
    private_redis,  # noqa: F811 - before stack_factory: torn down after the processes that use it
    stack_factory,  # noqa: F811
):
    stack = stack_factory(broker_url=private_redis.url, reaper_interval_s="1", lost_message_after_s="3")
    stack.start_api()
    stack.start_worker()
    client = stack.client()
    running = client.submit_job(**isvit_job(6))["id"]
    queued = [client.submit_job(**FAST_JOB)["id"] for _ in range(2)]
    stack.wait_stage(running, "stage1")
    settings = Settings(queue=stack.env["VITQ_QUEUE"], broker_url=private_redis.url)
    assert set(queued) <= pending_job_ids(settings)

    private_redis.restart()  # every message is gone: the queued ones and the running one's
    assert pending_job_ids(settings) == set()
    assert [stack.row(j).status for j in queued] == ["queued", "queued"]
    after = client.submit_job(**FAST_JOB)["id"]  # the API reconnects by itself

    for job in [running, *queued, after]:
        done = stack.wait_finished(job, timeout=240)
        assert done.status == "succeeded" and done.attempts == 1, (job, done.status, done.error_message)
        assert stack.outputs(job) == (4, 1)
        kinds = [kind for kind, _ in stack.events(job)]
        assert kinds.count("started") == 1 and kinds.count("succeeded") == 1
    for job in queued:  # each lost message sent again exactly once, by the reaper, from the row
        resent = [m for kind, m in stack.events(job) if kind == "requeued"]
        assert resent == ["broker lost its message; sent again"]
    assert not [m for kind, m in stack.events(running) if kind == "requeued"]


@dataclass
class Traffic:
    """Clients hitting the API in a loop; every answer recorded as (endpoint, status, error code)."""

    url: str
    key: str
    job: str
    answers: list[tuple[float, str, int, str]] = field(default_factory=list)
    created: dict[str, str] = field(default_factory=dict)
    """Idempotency-Key -> job id, for every POST that was answered 202."""
    refused: list[str] = field(default_factory=list)
    """Idempotency-Keys whose POST was answered 503."""
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        # Keep-alive shorter than uvicorn's 5 s, so a pause in this thread (a busy CI machine) never sends a
        # request on a connection the server is closing: an unanswered request must mean the service failed.
        limits = httpx.Limits(keepalive_expiry=1.0)
        with httpx.Client(base_url=self.url, headers=auth(self.key), timeout=30, limits=limits) as http:
            while not self.stop.is_set():
                key = f"k-{secrets.token_hex(4)}"
                for name, send in (
                    ("readyz", lambda: http.get("/readyz")),
                    ("read_job", lambda: http.get(f"/v1/jobs/{self.job}")),
                    ("list_jobs", lambda: http.get("/v1/jobs", params={"limit": 5})),
                    ("create_job", lambda k=key: http.post("/v1/jobs", json=FAST_JOB, headers={"Idempotency-Key": k})),
                ):
                    try:
                        response = send()
                    except httpx.TransportError as exc:  # no answer at all: recorded, and the test fails
                        self.answers.append((time.monotonic(), name, 0, f"{type(exc).__name__}: {exc}"[:200]))
                        continue
                    code = response.json().get("error", {}).get("code", "") if response.status_code >= 400 else ""
                    if name == "readyz" and response.status_code == 503:
                        code = response.json()["checks"]["database"]
                    self.answers.append((time.monotonic(), name, response.status_code, code))
                    if name == "create_job" and response.status_code == 202:
                        self.created[key] = response.json()["id"]
                    elif name == "create_job" and response.status_code == 503:
                        self.refused.append(key)
                time.sleep(0.1)


def test_postgres_restart_is_503_not_500_and_recovers_without_losing_rows(
    system_postgres,  # noqa: F811 - before stack_factory: running again before the processes stop
    stack_factory,  # noqa: F811
):
    stack = stack_factory()
    stack.start_api()
    stack.start_worker()
    client = stack.client()
    job = client.submit_job(**isvit_job(10))["id"]
    stack.wait_stage(job, "stage1")
    traffic = Traffic(stack.url, stack.key, job)
    thread = threading.Thread(target=traffic.run, daemon=True)
    thread.start()
    try:
        time.sleep(1.5)
        down = time.monotonic()
        system_postgres.stop()
        time.sleep(3)
        system_postgres.start()
        up = time.monotonic()
        wait_for(lambda: httpx.get(f"{stack.url}/readyz").status_code == 200, timeout=60, what="readyz")
        ready = time.monotonic()
        time.sleep(1.5)
    finally:
        traffic.stop.set()
        thread.join(timeout=60)
        if not system_postgres.online():
            system_postgres.start()

    statuses = {status for _, _, status, _ in traffic.answers}
    unanswered = [(round(t - down, 2), name, error) for t, name, status, error in traffic.answers if status == 0]
    assert statuses <= {200, 202, 503}, (sorted(statuses), unanswered)  # never a 500, never no answer
    outage = [a for a in traffic.answers if a[2] == 503]
    assert outage, "no request hit the outage"
    assert {code for _, name, _, code in outage if name != "readyz"} <= {"database_unavailable"}
    assert any(name == "readyz" and code.startswith("unreachable") for _, name, _, code in outage)
    assert all(down <= t <= ready + 1 for t, *_ in outage), "503 outside the outage"
    print(
        f"PostgreSQL down {up - down:.1f} s, /readyz 200 again {ready - up:.1f} s after start; "
        f"{len(traffic.answers)} requests, {len(outage)} answered 503, none 500"
    )

    # nothing lost or corrupted: the running job finishes on its first attempt, every 202 has its row,
    # a 503'd POST retried with its key creates exactly one job, a 202'd one replays the same job
    done = stack.wait_finished(job, timeout=240)
    assert done.status == "succeeded" and done.attempts == 1, (done.status, done.error_message)
    assert stack.outputs(job) == (4, 1)
    for key, job_id in traffic.created.items():
        assert stack.row(job_id).status in ("queued", "running", "succeeded")
        replay = httpx.post(
            f"{stack.url}/v1/jobs", json=FAST_JOB, headers=auth(stack.key) | {"Idempotency-Key": key}
        )
        assert replay.status_code == 202 and replay.json()["id"] == job_id
    for key in traffic.refused:
        retried = client.submit_job(idempotency_key=key, **FAST_JOB)
        assert client.submit_job(idempotency_key=key, **FAST_JOB)["id"] == retried["id"]
    listed = client.list_jobs(limit=200)["data"]
    assert len(listed) == 1 + len(traffic.created) + len(traffic.refused)
    for extra in listed:  # the traffic's jobs need not run
        if extra["id"] != job and extra["status"] == "queued":
            client.cancel_job(extra["id"])


@pytest.fixture
def silent_database(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A PostgreSQL URL whose host takes the TCP connection and then never answers, as a hung host or a
    lost network path does (a restarted server, above, refuses at once instead)."""
    from service.db import dispose_all
    from service.settings import get_settings

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)  # the kernel completes handshakes; nobody ever reads or writes
    monkeypatch.setenv("VITQ_DB_CONNECT_TIMEOUT_S", "2")
    get_settings.cache_clear()
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{listener.getsockname()[1]}/vitq"
    finally:
        listener.close()
        dispose_all()
        monkeypatch.undo()
        get_settings.cache_clear()


def test_a_silent_database_costs_a_request_the_connect_timeout_and_gets_503(silent_database, tmp_path):
    from fastapi.testclient import TestClient

    from api.app import create_app

    settings = Settings(data_dir=tmp_path, database_url=silent_database, queue=f"vitq-{secrets.token_hex(3)}")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        for path in ("/v1/jobs", "/readyz"):
            started = time.monotonic()
            response = client.get(path, headers=auth("vitq_" + "x" * 43))
            elapsed = time.monotonic() - started
            assert response.status_code == 503, (path, response.status_code, response.text)
            assert 1.5 < elapsed < 10, (path, elapsed)  # bounded by VITQ_DB_CONNECT_TIMEOUT_S=2, not minutes
            print(f"{path}: 503 after {elapsed:.2f} s")
        assert response.json()["checks"]["database"].startswith("unreachable")
        assert client.get("/healthz").status_code == 200
