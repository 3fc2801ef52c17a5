"""Jobs API in-process over PostgreSQL: auth, validation (422s), idempotency, pagination, cancel, tenancy."""

from __future__ import annotations

import pytest

from core import QuantConfig
from tests.helpers.factories import auth

GOOD = {
    "model": "fmnist-vit-tiny",
    "w_bits": 4,
    "a_bits": 4,
    "method": "isvit",
    "preset": "smoke",
    "calibration": "fashion-mnist:train:32",
    "evaluation": "fashion-mnist:test:64",
}


def test_health_and_ready(service):
    assert service.client.get("/healthz").json() == {"status": "ok"}
    ready = service.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}


@pytest.mark.parametrize(
    "headers, message",
    [
        ({}, "missing API key"),
        ({"Authorization": "Bearer vitq_not-a-real-key"}, "invalid or revoked"),
        ({"Authorization": "Bearer "}, "missing API key"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "missing API key"),
    ],
)
def test_auth_required(service, headers, message):
    for method, path in (
        ("GET", "/v1/jobs"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/datasets"),
        ("GET", "/v1/results"),
    ):
        response = service.client.request(method, path, headers=headers, json=GOOD)
        assert response.status_code == 401, (path, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert message in response.json()["error"]["message"]


def test_create_read_list_cancel(service):
    c, h = service.client, auth(service.key_a)
    created = c.post("/v1/jobs", json=GOOD, headers=h)
    assert created.status_code == 202, created.text
    job = created.json()
    assert created.headers["location"] == f"/v1/jobs/{job['id']}"
    assert created.headers["retry-after"] == "2"
    assert job["status"] == "queued" and job["error"] is None and job["result"] is None
    # the resolved config is stored: the preset's and the method's defaults filled in, as core resolves them
    resolved = QuantConfig(w_bits=GOOD["w_bits"], a_bits=GOOD["a_bits"], method=GOOD.get("method", "isvit"),
                           preset=GOOD["preset"], **GOOD.get("options", {})).resolved().to_dict()
    assert job["config"]["iters"] == 2 and job["config"]["softmax_quantizer"] == resolved["softmax_quantizer"]

    read = c.get(f"/v1/jobs/{job['id']}", headers=h)
    assert read.status_code == 200 and read.json()["id"] == job["id"]
    assert read.headers["retry-after"] == "2"

    listed = c.get("/v1/jobs", params={"status": "queued"}, headers=h).json()
    assert job["id"] in [j["id"] for j in listed["data"]]

    cancelled = c.post(f"/v1/jobs/{job['id']}/cancel", headers=h)
    assert cancelled.status_code == 202
    body = cancelled.json()
    assert body["status"] == "cancelled" and body["error"]["code"] == "cancelled"
    assert "retry-after" not in cancelled.headers
    again = c.post(f"/v1/jobs/{job['id']}/cancel", headers=h)
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
    events = c.get(f"/v1/jobs/{job['id']}/events", headers=h).json()["data"]
    assert [e["kind"] for e in events] == ["created", "cancelled"]


def test_cursor_pagination(service):
    c, h = service.client, auth(service.key_a)
    ids = [c.post("/v1/jobs", json=dict(GOOD, options={"seed": i}), headers=h).json()["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = c.get("/v1/jobs", params=params, headers=h).json()
        assert len(page["data"]) <= 2
        seen += [j["id"] for j in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen))
    assert seen[:5] == ids[::-1]  # newest first


def test_idempotency_key(service):
    c, h = service.client, auth(service.key_a)
    key = {"Idempotency-Key": "same-key-1"}
    first = c.post("/v1/jobs", json=GOOD, headers=h | key)
    second = c.post("/v1/jobs", json=GOOD, headers=h | key)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    different = c.post("/v1/jobs", json=dict(GOOD, w_bits=3), headers=h | key)
    assert different.status_code == 422
    assert different.json()["error"]["code"] == "idempotency_key_reused"
    # the key is per tenant: another tenant may use the same one
    other = c.post("/v1/jobs", json=GOOD, headers=auth(service.key_b) | key)
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]


@pytest.mark.parametrize(
    "change, code, fragment",
    [
        ({"w_bits": 0}, "invalid_request", "w_bits"),
        ({"w_bits": 9}, "invalid_request", "w_bits"),
        ({"w_bits": "x"}, "invalid_request", "w_bits"),
        ({"a_bits": "4"}, "invalid_request", "a_bits"),
        ({"a_bits": 4.5}, "invalid_request", "a_bits"),
        ({"w_bits": None}, "invalid_request", "w_bits"),
        ({"method": "magic"}, "invalid_request", "method"),
        ({"preset": "fast"}, "invalid_request", "preset"),
        ({"model": "no-such-model"}, "invalid_model", "unknown model"),
        ({"model": {"timm_name": "resnet50"}}, "invalid_model", "resnet50"),
        ({"model": {"timm_name": "vit_tiny_patch16_224", "timm_kwargs": {"foo": 1}}}, "invalid_model", "foo"),
        (
            {"model": {"timm_name": "vit_tiny_patch16_224", "timm_kwargs": {"embed_dim": 7}}},
            "invalid_model",
            "",
        ),
        ({"model": 5}, "invalid_request", "model"),
        ({"calibration": "fashion-mnist:val"}, "invalid_dataset", "fashion-mnist"),
        ({"calibration": "fashion-mnist:train:70000"}, "invalid_dataset", "60000"),
        ({"calibration": "ds_doesnotexist"}, "invalid_dataset", "unknown dataset"),
        ({"calibration": ""}, "invalid_request", "calibration"),
        ({"evaluation": "/etc/passwd"}, "invalid_dataset", "unknown dataset"),
        ({"options": {"iters": -1}}, "invalid_request", "iters"),
        ({"options": {"batch_size": 0}}, "invalid_request", "batch_size"),
        ({"options": {"bogus": 1}}, "invalid_request", "bogus"),
        ({"options": {"softmax_quantizer": "log2"}, "method": "repq"}, "invalid_config", "isvit"),
        ({"extra_field": 1}, "invalid_request", "extra_field"),
        ({"webhook_url": "ftp://example.com/x"}, "invalid_request", "webhook_url"),
    ],
)
def test_bad_job_requests(service, change, code, fragment):
    body = dict(GOOD) | change
    response = service.client.post("/v1/jobs", json=body, headers=auth(service.key_a))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert fragment in error["message"]


@pytest.mark.parametrize(
    "content, content_type, status, code",
    [
        (b"{not json", "application/json", 400, "invalid_json"),  # not JSON at all: 400 (issue 15)
        (b"", "application/json", 400, "invalid_json"),
        (b"[1, 2]", "application/json", 422, "invalid_request"),  # JSON, but not a job
        (b"w_bits=4", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    ],
)
def test_malformed_bodies(service, content, content_type, status, code):
    response = service.client.post(
        "/v1/jobs", content=content, headers=auth(service.key_a) | {"Content-Type": content_type}
    )
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_missing_required_fields(service):
    response = service.client.post("/v1/jobs", json={"model": "fmnist-vit-tiny"}, headers=auth(service.key_a))
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "w_bits" in message and "a_bits" in message and "calibration" in message


def test_other_tenant_gets_404(service):
    c = service.client
    job = c.post("/v1/jobs", json=GOOD, headers=auth(service.key_a)).json()
    for method, path in (
        ("GET", f"/v1/jobs/{job['id']}"),
        ("POST", f"/v1/jobs/{job['id']}/cancel"),
        ("GET", f"/v1/jobs/{job['id']}/events"),
        ("GET", f"/v1/jobs/{job['id']}/artifacts"),
        ("GET", f"/v1/jobs/{job['id']}/artifacts/report.json"),
    ):
        response = c.request(method, path, headers=auth(service.key_b))
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"]["code"] == "not_found"
    assert job["id"] not in [j["id"] for j in c.get("/v1/jobs", headers=auth(service.key_b)).json()["data"]]
    # and the owner still sees it, queued
    assert c.get(f"/v1/jobs/{job['id']}", headers=auth(service.key_a)).json()["status"] == "queued"


def test_unknown_route_and_method(service):
    assert service.client.get("/v1/nothing").json()["error"]["code"] == "not_found"
    response = service.client.delete("/v1/jobs", headers=auth(service.key_a))
    assert response.status_code == 405


def test_metrics(service):
    service.client.get("/healthz")
    text = service.client.get("/metrics").text
    assert 'vitq_jobs{status="queued"}' in text
    assert "vitq_queue_depth" in text
    assert 'vitq_http_request_duration_seconds_count{method="GET",route="/healthz",status="200"}' in text


def test_revoked_key(service):
    from service.db import session_scope
    from service.keys import create_key, revoke_key

    with session_scope(service.settings.resolved_database_url) as session:
        key = create_key(session, tenant_name="revocable").key
    assert service.client.get("/v1/jobs", headers=auth(key)).status_code == 200
    with session_scope(service.settings.resolved_database_url) as session:
        assert revoke_key(session, key_or_id=key)
    assert service.client.get("/v1/jobs", headers=auth(key)).status_code == 401
