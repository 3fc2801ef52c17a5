"""End to end through real processes: `vitq api` (uvicorn) + `vitq worker` (Celery) over the real
PostgreSQL and Redis. Upload a model and a dataset, cancel a running job (the worker then takes the
next one), run a job to success, download and check the artifacts, and re-evaluate the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import time

import httpx
import pytest

from tests.helpers import (
    assert_checkpoint_reproduces_report,
    start,
    stop,
    vitq_command,
    wait_for,
    wait_http,
)
from tests.helpers.factories import BUILTIN_WEIGHTS, FMNIST_TIMM, write_npz
from vitq.client import Client
from vitq.processes import free_port
from worker.webhooks import verify

pytestmark = pytest.mark.slow



def _drop_queue_keys(redis_url: str, queue: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"*{queue}*"):
        client.delete(key)


@pytest.fixture(scope="module")
def production(tmp_path_factory, migrated_pg, redis_url):
    data_dir = tmp_path_factory.mktemp("prod")
    env = dict(
        os.environ,
        VITQ_DATABASE_URL=migrated_pg,
        VITQ_BROKER_URL=redis_url,
        VITQ_QUEUE=f"vitq-e2e-{secrets.token_hex(3)}",
        VITQ_DATA_DIR=str(data_dir),
        VITQ_HEARTBEAT_INTERVAL_S="1",
        VITQ_PROGRESS_INTERVAL_S="0.5",
        VITQ_WEBHOOK_ALLOW_PRIVATE="1",  # the receiver is on 127.0.0.1
        VITQ_WEBHOOK_PORTS="*",
    )
    key = subprocess.run(
        vitq_command("keys", "create", "--tenant", f"e2e-{secrets.token_hex(3)}"),
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.strip()
    assert key.startswith("vitq_")
    port = free_port()
    api = start(vitq_command("api", "--host", "127.0.0.1", "--port", str(port)), env, data_dir / "api.log")
    worker = start(vitq_command("worker"), env, data_dir / "worker.log")
    webhooks = start(vitq_command("webhooks"), env, data_dir / "webhooks.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/readyz", proc=api)
        yield url, key, data_dir
    finally:
        stop(api)
        stop(worker)
        stop(webhooks)
        _drop_queue_keys(redis_url, env["VITQ_QUEUE"])
        for name in ("api.log", "worker.log", "webhooks.log"):
            print(f"--- {name} (tail)\n" + (data_dir / name).read_text(errors="replace")[-3000:])


def test_cancel_then_next_job_then_artifacts(production, tmp_path, receiver):
    url, key, data_dir = production
    client = Client(url, api_key=key, timeout=120)
    model = client.upload_model(
        BUILTIN_WEIGHTS,
        timm_name=FMNIST_TIMM["timm_name"],
        timm_kwargs=FMNIST_TIMM["timm_kwargs"],
        preprocess=FMNIST_TIMM["preprocess"],
    )
    npz = write_npz(tmp_path / "eval.npz", n=48)
    dataset = client.upload_dataset(npz)
    common = {
        "model": model["id"],
        "w_bits": 4,
        "a_bits": 4,
        "method": "isvit",
        "preset": "smoke",
        "calibration": "fashion-mnist:train:16",
        "evaluation": dataset["id"],
    }
    long_job = client.submit_job(**common, options={"iters": 100_000, "calib_size": 16})
    hook_url, hook = receiver
    hook.statuses.append(503)  # the first delivery fails; Celery retries it with backoff
    next_job = client.submit_job(**common, options={"calib_size": 16, "iters": 1}, webhook_url=hook_url)

    # cancel the long job once it is optimizing; it must end within 10 s
    def optimizing() -> bool:
        job = client.get_job(long_job["id"])
        assert job["status"] in ("queued", "running"), job
        return (job["progress"] or {}).get("stage", "").startswith("stage")

    wait_for(optimizing, timeout=400, what="the long job reaching reconstruction")
    running = client.get_job(long_job["id"])
    assert running["status"] == "running" and running["progress"]["total_steps"] > 0
    assert running["progress"]["percent"] is not None
    started = time.monotonic()
    assert client.cancel_job(long_job["id"])["cancel_requested"] is True
    cancelled = client.wait(long_job["id"], timeout=10, poll=0.25)
    assert cancelled["status"] == "cancelled", cancelled
    assert time.monotonic() - started <= 10
    assert cancelled["error"]["code"] == "cancelled"

    # the same worker takes the next job and finishes it
    done = client.wait(next_job["id"], timeout=400, poll=1)
    assert done["status"] == "succeeded", done
    result = done["result"]
    assert 0 <= result["quant_top1"] <= 1 and 0 <= result["fp_top1"] <= 1

    artifacts = {a["name"]: a for a in client.list_artifacts(done["id"])}
    assert set(artifacts) == {"checkpoint.safetensors", "report.json", "report.html", "model.onnx"}
    ckpt = client.download_artifact(done["id"], "checkpoint.safetensors", tmp_path)
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert sha == artifacts["checkpoint.safetensors"]["sha256"] == result["checkpoint_sha256"]
    onnx_file = client.download_artifact(done["id"], "model.onnx", tmp_path)
    onnx_sha = hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    assert onnx_sha == artifacts["model.onnx"]["sha256"] == result["onnx_sha256"]
    report_path = client.download_artifact(done["id"], "report.json", tmp_path)
    html = client.download_artifact(done["id"], "report.html", tmp_path).read_text()
    assert html.count("<svg") == 3 and "Per-layer SQNR" in html

    headers = {"Authorization": f"Bearer {key}"}
    base = f"{url}/v1/jobs/{done['id']}/artifacts/checkpoint.safetensors"
    partial = httpx.get(base, headers=headers | {"Range": "bytes=100-199"})
    assert partial.status_code == 206 and partial.content == ckpt.read_bytes()[100:200]
    assert partial.headers["etag"] == f'"{sha}"'
    assert httpx.get(base, headers=headers | {"If-None-Match": f'"{sha}"'}).status_code == 304
    assert httpx.get(base, headers=headers | {"Range": "bytes=999999999-"}).status_code == 416

    report = json.loads(report_path.read_text())
    assert report["quant"]["top1"] == result["quant_top1"]
    # core.load + core.evaluate on the downloaded checkpoint gives the report's top-1, exactly
    assert_checkpoint_reproduces_report(ckpt, npz, report)
    # the downloaded model.onnx, run in ONNX Runtime, gives the report's top-1 within 0.1 points
    from core import load_dataset
    from core.export import evaluate_onnx, read_onnx_metadata
    from core.models import make_spec

    spec = make_spec({**read_onnx_metadata(onnx_file)["model"], "checkpoint": None})
    onnx_top1 = evaluate_onnx(onnx_file, load_dataset(str(npz), spec.preprocess))["top1"]
    assert abs(onnx_top1 - report["quant"]["top1"]) <= 0.001, (onnx_top1, report["quant"]["top1"])

    rows = client.results(model=model["id"], w_bits=4, a_bits=4, method="isvit")
    assert [r["job_id"] for r in rows] == [done["id"]]
    assert rows[0]["quant_top1"] == report["quant"]["top1"] and rows[0]["fp_top1"] == report["fp"]["top1"]

    events = [
        e["kind"] for e in httpx.get(f"{url}/v1/jobs/{done['id']}/events", headers=headers).json()["data"]
    ]
    lifecycle = [kind for kind in events if kind != "webhook"]
    assert lifecycle[0] == "created" and lifecycle[1] == "started" and lifecycle[-1] == "succeeded"
    assert "stage" in lifecycle
    wait_for(lambda: len(hook.received) >= 2, timeout=60, what="the webhook retry")
    secret = httpx.get(f"{url}/v1/tenant", headers=headers).json()["webhook_secret"]
    for hook_headers, body in hook.received:
        assert verify(secret, hook_headers, body) and json.loads(body)["type"] == "job.succeeded"
    deliveries = client.get_job(done["id"])["webhook"]["deliveries"]
    assert [(d["attempt"], d["ok"], d["status_code"]) for d in deliveries] == [
        (1, False, 503),
        (2, True, 200),
    ]
    metrics = httpx.get(f"{url}/metrics").text
    assert 'vitq_job_duration_seconds_count{status="succeeded"}' in metrics
    assert 'vitq_jobs{status="cancelled"}' in metrics

