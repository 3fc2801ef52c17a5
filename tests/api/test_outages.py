"""What the API says when a dependency is down: 503 (never a lost job) for the broker, not ready for the
database."""

from __future__ import annotations

from fastapi.testclient import TestClient

from api.app import create_app
from tests.helpers import make_settings
from tests.helpers.factories import auth


def test_broker_down_is_503_not_a_lost_job(service, tmp_path):
    settings = make_settings(
        tmp_path, service.settings.resolved_database_url, broker_url="redis://127.0.0.1:1/0"
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["broker"].startswith("unreachable")
        assert ready.json()["checks"]["database"] == "ok"
        response = client.post(
            "/v1/jobs",
            headers=auth(service.key_a),
            json={
                "model": "fmnist-vit-tiny",
                "w_bits": 4,
                "a_bits": 4,
                "calibration": "fashion-mnist:train:32",
            },
        )
        assert response.status_code == 503 and response.json()["error"]["code"] == "broker_unavailable"
        assert client.get("/healthz").status_code == 200
    failed = service.client.get("/v1/jobs", params={"status": "failed"}, headers=auth(service.key_a)).json()
    assert any(j["error"]["code"] == "broker_unavailable" for j in failed["data"])


def test_database_down_readyz(tmp_path):
    settings = make_settings(tmp_path, "postgresql+psycopg://postgres@127.0.0.1:1/none")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("unreachable")
