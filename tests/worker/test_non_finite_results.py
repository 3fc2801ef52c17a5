"""Issue 19: a figure that is undefined is written as null, and a success that cannot be written fails
the job once instead of running it again.

A checkpoint whose head is zeroed gives constant logits: the head's SQNR is 10·log10(0 / noise) = -inf.
Before, report.json held ``-Infinity`` (not JSON) and on PostgreSQL the success write was refused, the
row stayed ``running``, the reaper re-queued it, it ran three times, ended ``worker_lost`` and left
blobs that no row names. Real PostgreSQL, the worker's ``run_job`` in-process.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file
from sqlalchemy import func, select

from service import lifecycle
from service.db import session_scope
from service.tables import Artifact, JobEvent, Report
from tests.helpers.blobs import orphan_blobs
from tests.helpers.factories import BUILTIN_WEIGHTS, FMNIST_TIMM, auth
from tests.helpers.jobs import read_job, submit_job
from worker.runner import run_job


def _strict_json(text: str):
    def refuse(name: str):
        raise AssertionError(f"{name} in a JSON document")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def zero_head_model(service, tmp_path_factory) -> str:
    weights = load_file(str(BUILTIN_WEIGHTS))
    weights["head.weight"] = torch.zeros_like(weights["head.weight"])
    weights["head.bias"] = torch.zeros_like(weights["head.bias"])
    path = tmp_path_factory.mktemp("zero-head") / "zero_head.safetensors"
    save_file(weights, str(path))
    response = service.client.post(
        "/v1/models",
        files={"file": ("zero_head.safetensors", path.read_bytes())},
        data={"timm_name": FMNIST_TIMM["timm_name"], "timm_kwargs": json.dumps(FMNIST_TIMM["timm_kwargs"]),
              "preprocess": json.dumps(FMNIST_TIMM["preprocess"])},
        headers=auth(service.key_a),
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _outputs(service, job_id: str) -> tuple[int, int]:
    with session_scope(service.settings.resolved_database_url) as session:
        artifacts = session.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id))
        reports = session.scalar(select(func.count()).select_from(Report).where(Report.job_id == job_id))
    return int(artifacts or 0), int(reports or 0)


def test_constant_logits_succeed_once_with_null_sqnr_and_strict_json(service, zero_head_model):
    """One run shows three things: the undefined SQNR is null everywhere, the config records the
    calib_size that ran (1000 asked, 32 images), and the public events do not name the worker."""
    job_id = submit_job(service, model=zero_head_model, exports=[], options={"calib_size": 1000})
    assert run_job(service.settings, job_id) == "succeeded"
    body = read_job(service, job_id)  # the API answers (a -inf in the row could not be returned)
    assert body["status"] == "succeeded" and body["attempts"] == 1, body
    report = _strict_json(service.client.get(f"/v1/jobs/{job_id}/artifacts/report.json",
                                             headers=auth(service.key_a)).text)
    head = next(layer for layer in report["layers"] if layer["name"] == "head")
    assert head["sqnr_db"] is None  # undefined (no signal), not -inf
    assert all(layer["sqnr_db"] is None or isinstance(layer["sqnr_db"], float) for layer in report["layers"])
    with session_scope(service.settings.resolved_database_url) as session:
        stored = session.scalar(select(Report.report).where(Report.job_id == job_id))
    assert next(layer for layer in stored["layers"] if layer["name"] == "head")["sqnr_db"] is None
    assert _outputs(service, job_id) == (3, 1) and not orphan_blobs(service.settings)

    assert report["config"]["calib_size"] == 32  # what ran
    calibration = report["calibration"]
    assert calibration["n"] == 32 and calibration["requested"] == 1000 and "1000 was asked for" in calibration["note"]
    assert body["options"]["calib_size"] == 1000  # what the request asked, still shown

    events = service.client.get(f"/v1/jobs/{job_id}/events", headers=auth(service.key_a)).json()["data"]
    assert "started" in [e["kind"] for e in events]
    assert socket.gethostname() not in json.dumps(events) and f":{os.getpid()}" not in json.dumps(events)


def test_a_success_write_that_fails_fails_the_job_once_and_keeps_no_blobs(service, monkeypatch):
    def refused(*args, **kwargs):
        raise ValueError("Out of range float values are not JSON compliant")  # what PostgreSQL's JSON said

    monkeypatch.setattr(lifecycle, "succeed", refused)
    job_id = submit_job(service, exports=[])
    assert run_job(service.settings, job_id) == "failed"
    monkeypatch.undo()
    body = read_job(service, job_id)
    assert body["status"] == "failed" and body["error"]["code"] == "result_not_recorded", body
    assert body["attempts"] == 1 and "could not be recorded" in body["error"]["message"]
    assert _outputs(service, job_id) == (0, 0)
    assert not orphan_blobs(service.settings)  # the three stored blobs were removed again
    assert run_job(service.settings, job_id) is None  # finished: no second run
    with session_scope(service.settings.resolved_database_url) as session:
        kinds = list(session.scalars(select(JobEvent.kind).where(JobEvent.job_id == job_id)))
    assert kinds.count("started") == 1 and "requeued" not in kinds
