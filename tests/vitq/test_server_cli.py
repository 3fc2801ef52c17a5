"""vitq/server_cli.py: the `vitq keys` verbs on the embedded default."""

from __future__ import annotations

import json
import os
import subprocess

from service.db import session_scope
from service.keys import authenticate
from tests.helpers import vitq_command


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
