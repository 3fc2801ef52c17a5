"""Worker pieces against the real PostgreSQL, in-process: claim CAS, reaper, progress throttling,
model/dataset materialization, webhooks (signed, retried, recorded), and the HTML report.
"""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from core import CancelledError
from service.archives import Limits
from service.db import session_scope
from service.job_inputs import data_path, spec_from_stored
from service.progress import EtaEstimator
from service.storage import get_store
from service.tables import Job, JobEvent, utcnow
from tests.service.factories import BUILTIN_WEIGHTS, FMNIST_TIMM, auth, write_imagefolder_zip, write_npz
from worker.reaper import reap_stale_jobs
from worker.report_html import render_report_html
from worker.runner import JobMonitor, claim
from worker.webhooks import WebhookDeliveryError, deliver_once, verify

JOB = {
    "model": "fmnist-vit-tiny",
    "w_bits": 4,
    "a_bits": 4,
    "preset": "smoke",
    "calibration": "fashion-mnist:train:32",
}


def _submit(service, **extra) -> str:
    response = service.client.post("/v1/jobs", json=JOB | extra, headers=auth(service.key_a))
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _set(service, job_id: str, **values) -> None:
    with session_scope(service.settings.resolved_database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def _job(service, job_id: str) -> dict:
    return service.client.get(f"/v1/jobs/{job_id}", headers=auth(service.key_a)).json()


def test_claim_is_compare_and_set(service):
    job_id = _submit(service)
    lease = claim(service.settings, job_id, "worker-1")
    assert lease is not None and (lease.worker, lease.attempt) == ("worker-1", 1)
    assert claim(service.settings, job_id, "worker-2") is None
    job = _job(service, job_id)
    assert job["status"] == "running" and job["attempts"] == 1
    cancelled = _submit(service)
    service.client.post(f"/v1/jobs/{cancelled}/cancel", headers=auth(service.key_a))
    assert claim(service.settings, cancelled, "worker-1") is None


def test_reaper_requeues_then_fails(service):
    settings = service.settings
    old = utcnow() - timedelta(seconds=settings.stale_after_s + 5)
    requeue, exhausted, cancelling, alive = (_submit(service) for _ in range(4))
    for job_id in (requeue, exhausted, cancelling, alive):
        assert claim(settings, job_id, "dead-worker")
    _set(service, requeue, heartbeat_at=old)
    _set(service, exhausted, heartbeat_at=old, attempts=settings.max_attempts)
    _set(service, cancelling, heartbeat_at=old, cancel_requested=True)
    sent: list[str] = []
    outcome = reap_stale_jobs(settings, sent.append)
    assert requeue in outcome["requeued"] and sent.count(requeue) == 1
    assert {exhausted, cancelling} <= set(outcome["ended"])
    assert _job(service, requeue)["status"] == "queued"
    failed = _job(service, exhausted)
    assert failed["status"] == "failed" and failed["error"]["code"] == "worker_lost"
    assert _job(service, cancelling)["status"] == "cancelled"
    assert _job(service, alive)["status"] == "running"  # heartbeat fresh: left alone
    # the re-queued job can be claimed again, by anyone, and counts the attempt
    assert claim(settings, requeue, "worker-2")
    assert _job(service, requeue)["attempts"] == 2


def test_stale_running_job_can_be_taken_over(service):
    job_id = _submit(service)
    assert claim(service.settings, job_id, "dead-worker")
    assert not claim(service.settings, job_id, "worker-2")
    _set(service, job_id, heartbeat_at=utcnow() - timedelta(seconds=service.settings.stale_after_s + 1))
    assert claim(service.settings, job_id, "worker-2")
    assert _job(service, job_id)["attempts"] == 2


def test_progress_is_throttled_and_has_percent_and_eta(service, monkeypatch):
    monkeypatch.setattr(service.settings, "progress_interval_s", 60.0)
    monkeypatch.setattr(service.settings, "heartbeat_interval_s", 0.2)
    job_id = _submit(service)
    lease = claim(service.settings, job_id, "me")
    assert lease is not None
    ticks = iter(range(1, 1000))
    with JobMonitor(service.settings, lease) as monitor:
        monitor._eta = EtaEstimator(clock=lambda: float(next(ticks)))  # one second per progress event
        for i in range(50):
            monitor.progress(
                {
                    "stage": "stage1",
                    "unit": "blocks.0",
                    "index": 0,
                    "total": 12,
                    "loss": 1.0,
                    "done": i + 1,
                    "total_steps": 100,
                }
            )
        monitor.progress(
            {
                "stage": "stage2",
                "unit": "blocks.0",
                "index": 0,
                "total": 12,
                "loss": 0.5,
                "done": 60,
                "total_steps": 100,
            }
        )
        assert not monitor.should_stop()
        service.client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(service.key_a))
        for _ in range(50):
            if monitor.should_stop():
                break
            threading.Event().wait(0.1)
        assert monitor.should_stop(), "cancel did not reach should_stop()"
        with pytest.raises(CancelledError):  # a stage boundary honours the cancel as well
            monitor.progress({"stage": "evaluate_quant", "done": 0, "total_steps": 0})
    progress = _job(service, job_id)["progress"]
    # rate from the first step seen (done=1 at t=1) to done=60 at t=51: 59 steps in 50 s, 40 to go
    assert progress["stage"] == "stage2" and progress["percent"] == 60.0
    assert progress["eta_seconds"] == pytest.approx(50 * 40 / 59, abs=0.1)
    with session_scope(service.settings.resolved_database_url) as session:
        stages = session.scalars(
            select(JobEvent.message).where(JobEvent.job_id == job_id, JobEvent.kind == "stage")
        ).all()
    assert stages == ["stage1", "stage2"]  # one write per stage change; the rest throttled


def test_uploaded_model_and_datasets_materialize_for_core(service, tmp_path):
    from core import build_model, load_dataset

    with open(BUILTIN_WEIGHTS, "rb") as f:
        model = service.client.post(
            "/v1/models",
            files={"file": ("w.safetensors", f)},
            data={
                "timm_name": FMNIST_TIMM["timm_name"],
                "timm_kwargs": json.dumps(FMNIST_TIMM["timm_kwargs"]),
            },
            headers=auth(service.key_a),
        ).json()
    job_id = _submit(service)
    with session_scope(service.settings.resolved_database_url) as session:
        stored = session.get(Job, job_id).model_spec
    store = get_store(service.settings.resolved_storage_dir)
    upload_spec = {
        "kind": "upload",
        "id": model["id"],
        "sha256": model["sha256"],
        "timm_name": model["timm_name"],
        "timm_kwargs": model["timm_kwargs"],
        "preprocess": None,
    }
    for spec_dict in (stored, upload_spec):
        spec = spec_from_stored(spec_dict, store, service.settings.resolved_cache_dir)
        assert sum(p.numel() for p in build_model(spec).parameters()) == 5353738
    limits = Limits(max_members=1000, max_bytes=10**8)
    for path in (write_npz(tmp_path / "m.npz", n=10), write_imagefolder_zip(tmp_path / "m.zip", n=10)):
        with open(path, "rb") as f:
            ds = service.client.post(
                "/v1/datasets", files={"file": (path.name, f)}, headers=auth(service.key_a)
            )
        with session_scope(service.settings.resolved_database_url) as session:
            local = data_path(
                session,
                store,
                ref=ds.json()["id"],
                cache_dir=service.settings.resolved_cache_dir,
                limits=limits,
            )
        assert len(load_dataset(local, spec.preprocess)) == 10


def test_webhook_signed_retried_and_recorded(service, receiver):
    url, handler = receiver
    handler.statuses.append(500)
    job_id = _submit(service, webhook_url=url)
    assert deliver_once(service.settings, job_id) is None  # not finished: nothing to send
    service.client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(service.key_a))
    with pytest.raises(WebhookDeliveryError):
        deliver_once(service.settings, job_id)  # the receiver answers 500 first
    assert deliver_once(service.settings, job_id) is True
    secret = service.client.get("/v1/tenant", headers=auth(service.key_a)).json()["webhook_secret"]
    assert len(handler.received) == 2
    for headers, body in handler.received:
        assert verify(secret, headers, body)
        assert headers["webhook-id"] == f"msg_{job_id}_cancelled"
        assert json.loads(body)["type"] == "job.cancelled" and json.loads(body)["data"]["id"] == job_id
    headers, body = handler.received[0]
    assert not verify(secret, headers, body + b" ")  # tampered body
    assert not verify("whsec_" + "A" * 44, headers, body)  # wrong secret
    deliveries = _job(service, job_id)["webhook"]["deliveries"]
    assert [(d["attempt"], d["ok"], d["status_code"]) for d in deliveries] == [
        (1, False, 500),
        (2, True, 200),
    ]


def test_report_html_has_the_three_plots():
    report = {
        "model": {"id": "fmnist-vit-tiny"},
        "w_bits": 4,
        "a_bits": 4,
        "method": "isvit",
        "preset": "smoke",
        "fp": {"top1": 0.84, "top5": 0.99, "n": 64},
        "quant": {"top1": 0.8, "top5": 0.98, "n": 64, "agreement": 0.9},
        "layers": [{"name": "blocks.0.attn.qkv", "sqnr_db": 21.5}, {"name": "head", "sqnr_db": 12.0}],
        "reconstruction": [{"stage": "stage1", "unit": "blocks.0", "loss_start": 40.0, "loss_end": 3.0}],
        "seconds": {"calibrate": 1.5, "total": 3.0},
        "device": "cpu",
    }
    html = render_report_html(report, job_id="job_x")
    assert html.count("<svg") == 3
    assert "84.00%" in html and "80.00%" in html and "blocks.0.attn.qkv" in html and "stage1" in html
    hostile = dict(report, model={"id": "<script>alert(1)</script>"})
    assert "<script>" not in render_report_html(hostile)
