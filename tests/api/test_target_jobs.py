"""Accuracy-target jobs at the API: ``"target"`` instead of fixed bits, refused (422) without labelled
evaluation data, with bits as well, or with a bad target; accepted ones keep the target and an unresolved
base config."""

from __future__ import annotations

import pytest

from tests.helpers.factories import auth

TARGET_JOB = {
    "model": "fmnist-vit-tiny",
    "target": {"max_top1_drop": 0.01, "w_bits": [3, 4, 8], "a_bits": [4, 8], "max_trials": 4},
    "preset": "smoke",
    "calibration": "fashion-mnist:train:32",
    "evaluation": "fashion-mnist:test:64",
}


def test_a_target_job_is_accepted_and_shows_its_target(service):
    created = service.client.post("/v1/jobs", json=TARGET_JOB, headers=auth(service.key_a))
    assert created.status_code == 202, created.text
    job = created.json()
    given = {k: v for k, v in job["target"].items() if v is not None}  # unset bounds are stored as null
    assert given == TARGET_JOB["target"] and job["w_bits"] is None and job["a_bits"] is None
    # the trials start from the smallest uniform widths; each fills the preset for its own widths
    assert (job["config"]["w_bits"], job["config"]["a_bits"]) == (3, 4) and job["config"]["iters"] is None
    read = service.client.get(f"/v1/jobs/{job['id']}", headers=auth(service.key_a)).json()
    assert read["target"] == job["target"]


@pytest.mark.parametrize(
    "change, code, fragment",
    [
        ({"evaluation": None}, "invalid_request", "needs labelled evaluation data"),
        ({"w_bits": 4}, "invalid_request", "not both"),
        ({"target": {"max_top1_drop": 2}}, "invalid_request", "max_top1_drop"),
        ({"target": {"max_top1_drop": 0.01, "w_bits": [9]}}, "invalid_request", "w_bits"),
        ({"target": {"max_top1_drop": 0.01, "max_trials": 0}}, "invalid_request", "max_trials"),
        ({"target": {"max_top1_drop": 0.01, "bogus": 1}}, "invalid_request", "bogus"),
        ({"target": {"w_bits": [4]}}, "invalid_request", "max_top1_drop"),
        ({"target": None}, "invalid_request", "w_bits"),
    ],
)
def test_bad_target_jobs_are_refused(service, change, code, fragment):
    body = {k: v for k, v in (TARGET_JOB | change).items() if v is not None}
    response = service.client.post("/v1/jobs", json=body, headers=auth(service.key_a))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == code and fragment in error["message"], error


def test_unlabelled_evaluation_data_is_refused_for_a_target_job(service, tmp_path):
    import numpy as np

    from tests.helpers.factories import fmnist

    x, _ = fmnist("test", 16)
    np.savez(tmp_path / "unlabelled.npz", x=x)
    with open(tmp_path / "unlabelled.npz", "rb") as f:
        uploaded = service.client.post("/v1/datasets", files={"file": ("unlabelled.npz", f)},
                                       headers=auth(service.key_a))
    assert uploaded.status_code == 201, uploaded.text
    body = TARGET_JOB | {"evaluation": uploaded.json()["id"]}
    response = service.client.post("/v1/jobs", json=body, headers=auth(service.key_a))
    assert response.status_code == 422 and "no labels" in response.json()["error"]["message"]
