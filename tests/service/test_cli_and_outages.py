"""`vitq keys` verbs on the embedded default, and what the API says when a dependency is down."""

from __future__ import annotations

import json
import os
import subprocess

from fastapi.testclient import TestClient

from api.app import create_app
from service.db import session_scope
from service.keys import authenticate
from tests.service.factories import auth
from tests.service.helpers import make_settings, vitq_command


def test_keys_create_and_revoke(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITQ_")} | {
        "VITQ_DATA_DIR": str(tmp_path)
    }
    made = subprocess.run(
        vitq_command("keys", "create", "--tenant", "ops", "--json"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    new = json.loads(made.stdout)
    assert (
        new["key"].startswith("vitq_")
        and new["tenant"] == "ops"
        and new["webhook_secret"].startswith("whsec_")
    )
    url = f"sqlite:///{tmp_path / 'vitq.db'}"
    with session_scope(url) as session:
        assert authenticate(session, key=new["key"]).name == "ops"
        from service.tables import ApiKey

        stored = session.get(ApiKey, new["key_id"])
        assert stored.key_hash != new["key"] and new["key"] not in stored.key_hash  # hashed at rest
    revoked = subprocess.run(
        vitq_command("keys", "revoke", new["key_id"]), env=env, capture_output=True, text=True, timeout=120
    )
    assert revoked.returncode == 0, revoked.stderr
    with session_scope(url) as session:
        assert authenticate(session, key=new["key"]) is None
    again = subprocess.run(
        vitq_command("keys", "revoke", new["key_id"]), env=env, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 1


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
