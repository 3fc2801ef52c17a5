"""End to end through `vitq serve` (the embedded default: SQLite, filesystem broker, local store,
API + one worker process), driven by the client and the `vitq jobs` CLI verbs.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

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
from tests.helpers.factories import BUILTIN_WEIGHTS, FMNIST_TIMM, auth, write_npz
from vitq.client import Client
from vitq.processes import free_port

pytestmark = pytest.mark.slow


def _cli(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(vitq_command(*args), env=env, capture_output=True, text=True, timeout=timeout)


def test_serve_end_to_end(tmp_path):
    data_dir = tmp_path / "vitq-data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITQ_")}
    env |= {
        "VITQ_DATA_DIR": str(data_dir),
        "VITQ_HEARTBEAT_INTERVAL_S": "1",
        "VITQ_STALE_AFTER_S": "5",
        "VITQ_REAPER_INTERVAL_S": "1",
    }
    # a key made before `vitq serve` starts works against it
    made = _cli(env, "keys", "create", "--tenant", "team-a", "--json", timeout=120)
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["key"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = start(vitq_command("serve", "--port", str(port)), env, tmp_path / "serve.log")
    try:
        wait_http(f"{url}/readyz", proc=serve)
        assert (data_dir / "vitq.db").is_file() and (data_dir / "local-api-key").is_file()
        local_key = (data_dir / "local-api-key").read_text().strip()
        assert local_key in (tmp_path / "serve.log").read_text()  # printed at start
        assert (
            httpx.get(f"{url}/v1/tenant", headers={"Authorization": f"Bearer {local_key}"}).json()["name"]
            == "local"
        )

        client = Client(url, api_key=key, timeout=120)
        cli_env = env | {"VITQ_URL": url, "VITQ_API_KEY": key}
        uploaded = _cli(
            cli_env,
            "models", "upload", str(BUILTIN_WEIGHTS), "--timm-name", FMNIST_TIMM["timm_name"],
            "--timm-kwargs", json.dumps(FMNIST_TIMM["timm_kwargs"]),
            "--preprocess", json.dumps(FMNIST_TIMM["preprocess"]),
        )  # fmt: skip
        assert uploaded.returncode == 0, uploaded.stderr[-2000:]
        model = json.loads(uploaded.stdout)
        npz = write_npz(tmp_path / "eval.npz", n=40, offset=200)
        uploaded = _cli(cli_env, "datasets", "upload", str(npz))
        assert uploaded.returncode == 0, uploaded.stderr[-2000:]
        dataset = json.loads(uploaded.stdout)
        assert dataset["n"] == 40 and client.list_datasets()[0]["id"] == dataset["id"]
        submitted = _cli(
            cli_env,
            "jobs", "submit", "--model", model["id"], "--w-bits", "4", "--a-bits", "4",
            "--preset", "smoke", "--calib", "fashion-mnist:train:16", "--eval", dataset["id"],
            "--calib-size", "16", "--iters", "1",
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr[-3000:]
        job_id = json.loads(submitted.stdout)["id"]

        # kill the process running the job: its heartbeat stops, the reaper re-queues it, it runs again
        wait_for(lambda: client.get_job(job_id)["status"] == "running", timeout=120, what="the job to start")
        with sqlite3.connect(data_dir / "vitq.db") as db:
            (holder,) = db.execute("SELECT worker FROM jobs WHERE id = ?", (job_id,)).fetchone()
        os.kill(int(holder.split(":")[1].split("/")[0]), signal.SIGKILL)

        waited = _cli(cli_env, "jobs", "wait", job_id, "--timeout", "500")
        assert waited.returncode == 0, waited.stderr[-3000:]
        job = json.loads(waited.stdout)
        assert job["status"] == "succeeded" and job["attempts"] == 2, job
        assert "succeeded" in waited.stderr  # progress lines were shown
        kinds = [
            e["kind"] for e in httpx.get(f"{url}/v1/jobs/{job_id}/events", headers=auth(key)).json()["data"]
        ]
        assert kinds.count("started") == 2 and "requeued" in kinds

        status = _cli(cli_env, "jobs", "status", job["id"])
        assert status.returncode == 0 and json.loads(status.stdout)["result"] == job["result"]
        out = tmp_path / "artifacts"
        downloaded = _cli(cli_env, "jobs", "download", job["id"], "--out", str(out))
        assert downloaded.returncode == 0, downloaded.stderr
        assert sorted(Path(p).name for p in downloaded.stdout.split()) == [
            "checkpoint.safetensors",
            "model.onnx",
            "report.html",
            "report.json",
        ]
        ckpt = out / "checkpoint.safetensors"
        assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == job["result"]["checkpoint_sha256"]
        report = json.loads((out / "report.json").read_text())
        assert report["quant"]["top1"] == job["result"]["quant_top1"]

        other = _cli(cli_env | {"VITQ_API_KEY": local_key}, "jobs", "status", job["id"])
        assert other.returncode == 2 and "404" in other.stderr  # another tenant's job
        results = _cli(cli_env, "results", "--model", model["id"], "--w-bits", "4")
        assert results.returncode == 0 and json.loads(results.stdout)[0]["job_id"] == job["id"]
        # core.load + core.evaluate on the downloaded checkpoint gives the report's top-1, exactly
        assert_checkpoint_reproduces_report(ckpt, npz, report)
    finally:
        stop(serve)
        print((tmp_path / "serve.log").read_text(errors="replace")[-3000:])
    assert serve.returncode is not None
    # serve stopped its worker too: no process is left with this data directory in its environment
    marker = f"VITQ_DATA_DIR={data_dir}".encode()
    leftovers = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                leftovers.append(environ.parent.name)
        except OSError:
            continue
    assert not leftovers, f"processes left running: {leftovers}"


def test_serve_soft_time_limit_fails_the_job(tmp_path):
    """A job past VITQ_JOB_SOFT_TIME_LIMIT_S is stopped by Celery and recorded as failed (`timeout`)."""
    data_dir = tmp_path / "vitq-data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITQ_")}
    env |= {"VITQ_DATA_DIR": str(data_dir), "VITQ_JOB_SOFT_TIME_LIMIT_S": "4", "VITQ_JOB_TIME_LIMIT_S": "120"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = start(vitq_command("serve", "--port", str(port)), env, tmp_path / "serve.log")
    try:
        wait_http(f"{url}/readyz", proc=serve)
        client = Client(url, api_key=(data_dir / "local-api-key").read_text().strip(), timeout=60)
        job = client.submit_job(
            model="fmnist-vit-tiny",
            w_bits=4,
            a_bits=4,
            preset="smoke",
            calibration="fashion-mnist:train:16",
            options={"iters": 100_000},
        )
        done = client.wait(job["id"], timeout=180, poll=0.5)
        assert done["status"] == "failed", done
        assert done["error"]["code"] == "timeout" and "time limit" in done["error"]["message"]
        assert client.health()
    finally:
        stop(serve)
