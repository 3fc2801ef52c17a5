"""Issue 20 through the service: model ids as timm and the Hub write them, pretrained weights fetched by the
worker under the operator's hub policy, and every way of not having them refused at once.

The hub is tests/helpers/fake_hub.py on 127.0.0.1 serving a timm-format repository of the bundled
Fashion-MNIST ViT; the Hugging Face cache is written by huggingface_hub itself downloading from it. Jobs
run in-process (``worker.runner.run_job``) on the smoke preset with ``ptq-uniform`` and 200 test images.
"""

from __future__ import annotations

import hashlib
import socket
import time

import pytest
import timm
from safetensors.torch import load_file
from sqlalchemy import select

from core import evaluate, load, load_dataset, read_checkpoint_metadata, resolve_model_spec
from core.hub_weights import HubAccess, HubPolicy, fetch_weights
from core.model_ids import HubRef
from core.models import make_spec
from service.db import session_scope
from service.tables import JobEvent, Report
from tests.helpers.factories import BUILTIN_WEIGHTS, FMNIST_TIMM, auth
from tests.helpers.fake_hub import FakeHub, fmnist_repo
from worker import runner

REPO = "vitq-test/fmnist-vit-tiny"
TAGGED = "vit_tiny_patch16_224.augreg_in21k"
EVAL = "fashion-mnist:test:200"
JOB = {"w_bits": 8, "a_bits": 8, "method": "ptq-uniform", "preset": "smoke", "exports": [],
       "calibration": "fashion-mnist:train:32", "evaluation": EVAL}
TAGGED_MODEL = {"timm_name": TAGGED, "timm_kwargs": FMNIST_TIMM["timm_kwargs"],
                "preprocess": {"mean": [0.286], "std": [0.353]}}
BUILTIN_SHA = hashlib.sha256(BUILTIN_WEIGHTS.read_bytes()).hexdigest()
THREE_WAYS = ("VITQ_MODEL_CACHE", "vitq models pull", "vitq models import", "upload")


@pytest.fixture(scope="module")
def hub():
    with FakeHub({REPO: fmnist_repo(), f"timm/{TAGGED}": fmnist_repo()}) as server:
        yield server


@pytest.fixture(scope="module")
def operator_cache(hub, tmp_path_factory):
    """The operator's cache, filled on a "connected machine" by huggingface_hub from the loopback hub."""
    cache = tmp_path_factory.mktemp("operator-cache")
    online = HubPolicy(HubAccess.ONLINE, cache, endpoint=hub.url)
    for repo in (REPO, f"timm/{TAGGED}"):
        fetch_weights(online, HubRef(repo))
    return cache


def _hub_policy(service, monkeypatch, access: str, cache, orgs: str = "") -> None:
    monkeypatch.setattr(service.settings, "hub_access", access)
    monkeypatch.setattr(service.settings, "model_cache", cache)
    monkeypatch.setattr(service.settings, "hub_allowed_orgs", orgs)


def _submit(service, model, **extra):
    started = time.perf_counter()
    response = service.client.post("/v1/jobs", json={**JOB, "model": model, **extra}, headers=auth(service.key_a))
    return response, time.perf_counter() - started


def _report(service, job_id: str) -> dict:
    with session_scope(service.settings.resolved_database_url) as session:
        return session.scalar(select(Report).where(Report.job_id == job_id)).report


def _stages(service, job_id: str) -> list[str]:
    with session_scope(service.settings.resolved_database_url) as session:
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == "stage"))
        return [e.message for e in events]


def _fp_top1_by_hand(cache) -> float:
    """The cached weights loaded by hand: timm's model, the safetensors file, Fashion-MNIST's normalisation."""
    snapshot = next((cache / "models--vitq-test--fmnist-vit-tiny" / "snapshots").iterdir())
    model = timm.create_model(FMNIST_TIMM["timm_name"], **FMNIST_TIMM["timm_kwargs"]).eval()
    model.load_state_dict({k: v.float() for k, v in load_file(str(snapshot / "model.safetensors")).items()})
    preprocess = make_spec({**FMNIST_TIMM, "weights": "random"}).preprocess
    return evaluate(model, load_dataset(EVAL, preprocess))["top1"]


def test_cache_only_quantizes_hub_and_tagged_timm_ids_from_the_operator_cache(
    service, monkeypatch, operator_cache, tmp_path
):
    _hub_policy(service, monkeypatch, "cache-only", operator_cache)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")  # nothing may be fetched
    by_hand = _fp_top1_by_hand(operator_cache)
    reports = {}
    for model in (TAGGED_MODEL, REPO, f"hf-hub:{REPO}"):
        response, _ = _submit(service, model)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        assert runner.run_job(service.settings, job_id) == "succeeded"
        report = _report(service, job_id)
        weights = report["weights"]
        assert weights["weights_sha256"] == BUILTIN_SHA and weights["from_cache"] is True
        assert weights["repo_id"] in (REPO, f"timm/{TAGGED}") and len(weights["commit"]) == 40
        assert {f["name"] for f in weights["files"]} == {"config.json", "model.safetensors"}
        assert "fetch_weights" in _stages(service, job_id)
        reports[str(model)] = report
    hub_report = reports[f"hf-hub:{REPO}"]
    assert hub_report["fp"]["top1"] == by_hand > 0.7
    assert reports[REPO]["fp"]["top1"] == by_hand  # the same repository as org/repo: the same weights
    assert hub_report["model"]["model_id"] == f"hf-hub:{REPO}"
    assert hub_report["model"]["timm_name"] == "vit_tiny_patch16_224"
    # the checkpoint header records the weights too, and the checkpoint loads without the hub
    download = service.client.get(f"/v1/jobs/{response.json()['id']}/artifacts/checkpoint.safetensors",
                                  headers=auth(service.key_a))
    (tmp_path / "checkpoint.safetensors").write_bytes(download.content)
    header = read_checkpoint_metadata(tmp_path / "checkpoint.safetensors")
    assert header["weights"]["weights_sha256"] == BUILTIN_SHA and header["weights"]["repo_id"] == REPO
    assert load(tmp_path / "checkpoint.safetensors") is not None


def test_online_downloads_once_with_progress_and_refuses_other_organisations_at_submit(
    service, monkeypatch, hub, tmp_path
):
    cache = tmp_path / "worker-cache"
    _hub_policy(service, monkeypatch, "online", cache, orgs="vitq-test")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    events: list[dict] = []
    original = runner.JobMonitor.progress
    monkeypatch.setattr(runner.JobMonitor, "progress", lambda self, e: (events.append(e), original(self, e))[1])
    before = hub.gets("model.safetensors")
    job_ids = []
    for _ in range(2):
        response, _ = _submit(service, f"hf-hub:{REPO}")
        assert response.status_code == 202, response.text
        job_ids.append(response.json()["id"])
        assert runner.run_job(service.settings, job_ids[-1]) == "succeeded"
    assert hub.gets("model.safetensors") == before + 1  # the worker downloaded once; the second job read the cache
    first, second = (_report(service, j)["weights"] for j in job_ids)
    assert first["from_cache"] is False and second["from_cache"] is True
    assert first["weights_sha256"] == second["weights_sha256"] == BUILTIN_SHA
    fetch = [e for e in events if e["stage"] == "fetch_weights" and e["unit"] == "model.safetensors"]
    assert fetch and fetch[-1]["done"] == fetch[-1]["total_steps"] == BUILTIN_WEIGHTS.stat().st_size
    assert (cache / "models--vitq-test--fmnist-vit-tiny" / "refs" / "main").is_file()
    for refused in (f"hf-hub:timm/{TAGGED}", TAGGED_MODEL, "deit_small_patch16_224.fb_in1k"):
        response, seconds = _submit(service, refused)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "model_not_allowed"
        assert "allow-list" in response.json()["error"]["message"] and seconds < 3


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("access", "model", "code", "words"), [
    ("off", "deit_small_patch16_224", "weights_unavailable", THREE_WAYS),
    ("off", f"hf-hub:{REPO}", "weights_unavailable", THREE_WAYS),
    ("off", {"timm_name": "deit_small_patch16_224"}, "weights_unavailable", THREE_WAYS),
    ("cache-only", "deit_tiny_patch16_224.fb_in1k", "weights_unavailable", THREE_WAYS),
    ("cache-only", "hf-hub:someone/absent", "weights_unavailable", THREE_WAYS),
    ("off", "vit_base_patch16_gap_224", "invalid_model", ("has no weights", '"weights": "random"')),
    ("off", "deit_smal_patch16_224", "invalid_model", ("did you mean deit_small_patch16_224", "fmnist-vit-tiny")),
    ("off", "deit_small_patch16_224.in1k", "invalid_model", ("its tags: fb_in1k",)),
    ("off", {"timm_name": "deit_tiny_patch16_224", "timm_kwargs": {"pretrained": True}}, "invalid_model",
     ("pretrained weights",)),
])
def test_weights_that_cannot_be_had_are_a_422_at_submit_in_well_under_a_second(
    service, monkeypatch, tmp_path, access, model, code, words
):
    _hub_policy(service, monkeypatch, access, tmp_path / "empty")
    response, seconds = _submit(service, model)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == code and all(w in error["message"] for w in words), error
    assert seconds < 3, seconds  # measured: see docs/models.md (timm's pretrained=True waited 46-52 s)


def test_an_unreachable_mirror_fails_the_job_at_once_not_after_a_retry_loop(service, monkeypatch, tmp_path):
    _hub_policy(service, monkeypatch, "online", tmp_path / "cache")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    response, _ = _submit(service, TAGGED_MODEL)
    assert response.status_code == 202, response.text  # online: the worker fetches
    started = time.perf_counter()
    assert runner.run_job(service.settings, response.json()["id"]) == "failed"
    seconds = time.perf_counter() - started
    job = service.client.get(f"/v1/jobs/{response.json()['id']}", headers=auth(service.key_a)).json()
    assert job["error"]["code"] == "weights_unavailable"
    assert "could not be reached" in job["error"]["message"]
    assert all(w in job["error"]["message"] for w in THREE_WAYS)
    assert seconds < 15, seconds


def test_random_weights_only_when_asked(service, monkeypatch, tmp_path):
    _hub_policy(service, monkeypatch, "off", tmp_path)
    tiny = {"timm_name": "vit_tiny_patch16_224", "timm_kwargs": {**FMNIST_TIMM["timm_kwargs"], "depth": 1}}
    refused, _ = _submit(service, tiny)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "weights_unavailable"
    asked, _ = _submit(service, {**tiny, "weights": "random"})
    assert asked.status_code == 202, asked.text
    assert resolve_model_spec({**tiny, "weights": "random"}).weights_kind == "random"
