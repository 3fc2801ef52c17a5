"""Multi-tenant safety through real processes: two `vitq api` processes, a `vitq worker` and `vitq webhooks`
over the real PostgreSQL and Redis.

- the per-key rate limit is one counter in Redis for both API processes (set with `vitq tenants limits`);
- a second tenant is neither limited nor refused while the first one floods and gets 429s;
- a cancelled job's webhook is delivered within seconds while a long job occupies the only worker (the
  webhook queue has its own consumer);
- a running job is deleted (cancelled first) and the worker drops it; a dataset in use cannot be deleted.

Figures (latencies, counts) are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import threading
import time

import httpx
import pytest

from tests.helpers import start, stop, vitq_command, wait_for, wait_http
from tests.helpers.factories import write_npz
from vitq.client import Client
from vitq.processes import free_port
from worker.webhooks import verify

pytestmark = pytest.mark.slow
LONG = {"options": {"iters": 100_000, "calib_size": 16}}
QUICK = {
    "model": "fmnist-vit-tiny",
    "w_bits": 4,
    "a_bits": 4,
    "method": "repq",
    "preset": "smoke",
    "calibration": "fashion-mnist:train:16",
}


def _drop_queue_keys(redis_url: str, queue: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"*{queue}*"):
        client.delete(key)


def _key(database_url: str, tenant: str) -> str:
    from service.db import session_scope
    from service.keys import create_key

    with session_scope(database_url) as session:
        return create_key(session, tenant_name=tenant).key


@pytest.fixture(scope="module")
def stack(tmp_path_factory, migrated_pg, redis_url):
    data_dir = tmp_path_factory.mktemp("tenants")
    env = dict(
        os.environ,
        VITQ_DATABASE_URL=migrated_pg,
        VITQ_BROKER_URL=redis_url,
        VITQ_QUEUE=f"vitq-mt-{secrets.token_hex(3)}",
        VITQ_DATA_DIR=str(data_dir),
        VITQ_HEARTBEAT_INTERVAL_S="1",
        VITQ_PROGRESS_INTERVAL_S="0.5",
        VITQ_WEBHOOK_ALLOW_PRIVATE="1",  # the receiver is on 127.0.0.1
        VITQ_WEBHOOK_PORTS="*",
    )
    run = secrets.token_hex(3)
    tenants = {"limited": f"limited-{run}", "other": f"other-{run}"}
    keys = {role: _key(migrated_pg, name) for role, name in tenants.items()}
    ports = [free_port(), free_port()]
    procs = {
        f"api{i}": start(vitq_command("api", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"),
                         env, data_dir / f"api{i}.log")
        for i, port in enumerate(ports)
    }
    procs["worker"] = start(vitq_command("worker"), env, data_dir / "worker.log")
    procs["webhooks"] = start(vitq_command("webhooks"), env, data_dir / "webhooks.log")
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for i, url in enumerate(urls):
            wait_http(f"{url}/readyz", proc=procs[f"api{i}"])
        yield {"env": env, "urls": urls, "keys": keys, "tenants": tenants, "data_dir": data_dir}
    finally:
        for proc in procs.values():
            stop(proc)
        _drop_queue_keys(redis_url, env["VITQ_QUEUE"])
        for name in procs:
            print(f"--- {name}.log (tail)\n" + (data_dir / f"{name}.log").read_text(errors="replace")[-2000:])


def _limits(stack, role: str, *args: str) -> dict:
    out = subprocess.run(vitq_command("tenants", "limits", "--tenant", stack["tenants"][role], *args),
                         env=stack["env"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _set_limits(stack, role: str, **limits) -> None:
    from sqlalchemy import select

    from service.db import session_scope
    from service.quotas import set_limits
    from service.tables import Tenant

    with session_scope(stack["env"]["VITQ_DATABASE_URL"]) as session:
        set_limits(session, session.scalar(select(Tenant).where(Tenant.name == stack["tenants"][role])), **limits)


def test_two_api_processes_share_the_rate_limit_counter(stack):
    shown = _limits(stack, "limited", "--rps", "0.5", "--burst", "6")
    assert shown["effective"]["rate_limit_rps"] == 0.5 and shown["own"]["rate_limit_burst"] == 6
    headers = {"Authorization": f"Bearer {stack['keys']['limited']}"}
    with httpx.Client(headers=headers, timeout=10) as http:
        answers = [(i % 2, http.get(f"{stack['urls'][i % 2]}/v1/jobs")) for i in range(12)]
    statuses = [r.status_code for _, r in answers]
    # one bucket of 6 for both processes; two buckets would have let all 12 through
    assert statuses == [200] * 6 + [429] * 6, statuses
    assert {p for p, r in answers if r.status_code == 429} == {0, 1}  # both processes refuse
    limited = answers[-1][1]
    assert int(limited.headers["Retry-After"]) >= 1 and limited.headers["RateLimit-Remaining"] == "0"
    assert limited.json()["error"]["code"] == "rate_limited"
    print(f"\nrate limit (0.5/s, burst 6) across 2 API processes: {statuses}, "
          f"Retry-After {limited.headers['Retry-After']} s")


def _cli(stack, *args: str) -> subprocess.CompletedProcess:
    env = stack["env"] | {"VITQ_URL": stack["urls"][0], "VITQ_API_KEY": stack["keys"]["other"]}
    return subprocess.run(vitq_command(*args), env=env, capture_output=True, text=True, timeout=120)


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def _poll(url: str, key: str, seconds: float, out: list[tuple[int, float]], stop_flag: threading.Event | None = None,
          pause: float = 0.02) -> None:
    with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=10) as http:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (stop_flag and stop_flag.is_set()):
            started = time.perf_counter()
            status = http.get(f"{url}/v1/jobs", params={"limit": 1}).status_code
            out.append((status, time.perf_counter() - started))
            if pause:
                time.sleep(pause)


def test_a_limited_tenant_does_not_slow_another(stack):
    """Tenant `other` polls at ~30 req/s, alone and then while `limited` floods both processes from 4
    threads far over its limit (0.5/s): `other` is never refused and its p99 stays bounded."""
    _set_limits(stack, "limited", rate_limit_rps=0.5, rate_limit_burst=2)
    url, other_key, limited_key = stack["urls"][0], stack["keys"]["other"], stack["keys"]["limited"]
    alone: list[tuple[int, float]] = []
    _poll(url, other_key, 3.0, alone)
    flood: list[tuple[int, float]] = []
    stop_flag = threading.Event()
    flooders = [
        threading.Thread(target=_poll, args=(stack["urls"][i % 2], limited_key, 10.0, flood, stop_flag, 0.0))
        for i in range(4)
    ]
    for t in flooders:
        t.start()
    during: list[tuple[int, float]] = []
    _poll(url, other_key, 3.0, during)
    stop_flag.set()
    for t in flooders:
        t.join()
    assert {s for s, _ in alone} == {200} and {s for s, _ in during} == {200}
    flood_statuses = [s for s, _ in flood]
    assert flood_statuses.count(429) > 0.9 * len(flood_statuses)
    p99_alone, p99_during = _p99([d for _, d in alone]) * 1000, _p99([d for _, d in during]) * 1000
    print(f"\nsecond tenant: {len(alone)} requests alone p99 {p99_alone:.1f} ms; {len(during)} requests while "
          f"the first sent {len(flood)} ({flood_statuses.count(429)} x 429) p99 {p99_during:.1f} ms")
    assert p99_during < 1000, p99_during


def test_webhook_is_sent_within_seconds_while_a_long_job_runs_then_delete(stack, receiver, tmp_path):
    hook_url, hook = receiver
    client = Client(stack["urls"][1], api_key=stack["keys"]["other"], timeout=60)
    dataset = client.upload_dataset(write_npz(tmp_path / "eval.npz", n=32))
    long_job = client.submit_job(**QUICK | {"method": "isvit", "evaluation": dataset["id"]}, **LONG)

    wait_for(lambda: client.get_job(long_job["id"])["status"] == "running", timeout=120, what="the long job")
    refused = _cli(stack, "datasets", "delete", dataset["id"])  # the CLI verb, against the other process
    assert refused.returncode == 2 and "409 dataset_in_use" in refused.stderr, refused.stderr

    # a second job, queued behind the long one, is cancelled: its webhook must not wait for the worker
    queued = client.submit_job(**QUICK, webhook_url=hook_url)
    cancelled_at = time.monotonic()
    assert client.cancel_job(queued["id"])["status"] == "cancelled"
    wait_for(lambda: len(hook.received) >= 1, timeout=15, what="the cancelled job's webhook", poll=0.05)
    latency = time.monotonic() - cancelled_at
    assert client.get_job(long_job["id"])["status"] == "running"  # the long job still holds the worker
    headers, body = hook.received[0]
    secret = httpx.get(f"{stack['urls'][1]}/v1/tenant",
                       headers={"Authorization": f"Bearer {stack['keys']['other']}"}).json()["webhook_secret"]
    assert verify(secret, headers, body) and json.loads(body)["type"] == "job.cancelled"
    print(f"\nwebhook of a cancelled job delivered {latency:.2f} s after the cancel, while the long job ran")
    assert latency < 5.0

    # deleting the running job cancels it: the worker finds the row gone and drops the work
    deleted_at = time.monotonic()
    client.delete_job(long_job["id"])
    with pytest.raises(Exception, match="404"):
        client.get_job(long_job["id"])
    log = stack["data_dir"] / "worker.log"
    dropped = f"job {long_job['id']} was taken from this worker; dropping it"
    wait_for(lambda: dropped in log.read_text(errors="replace"), timeout=120, what="the worker dropping the job")
    print(f"DELETE of the running job: the worker dropped it {time.monotonic() - deleted_at:.1f} s later")
    deleted = _cli(stack, "datasets", "delete", dataset["id"])  # no job uses it any more
    assert deleted.returncode == 0, deleted.stderr
    assert all(d["id"] != dataset["id"] for d in client.list_datasets())
