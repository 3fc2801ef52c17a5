"""Fixtures for the service tests: a throwaway PostgreSQL database, a Redis db number, an
in-process API (FastAPI TestClient) with two tenants, and a webhook receiver. Helpers the tests
import live in ``tests/service/helpers.py``.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Iterator
from http.server import HTTPServer

import pytest
from sqlalchemy import create_engine, text

from service.db import dispose_all, session_scope
from service.keys import create_key
from tests.helpers import PG_ADMIN_URL, REDIS_URL, Service, WebhookReceiver, make_settings
from tests.helpers.blobs import orphan_blobs


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    name = f"vitq_test_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)  # survives a restart
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    dispose_all()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A Redis db number of its own (queues are named per test as well)."""
    import redis

    db = int(os.environ.get("VITQ_TEST_REDIS_DB", "13"))
    url = f"{REDIS_URL}/{db}"
    redis.Redis.from_url(url).ping()
    return url


@pytest.fixture(scope="session")
def migrated_pg(pg_url: str) -> str:
    import migrations

    migrations.upgrade(pg_url)
    return pg_url


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, migrated_pg: str) -> Iterator[Service]:
    """The API in-process over the real PostgreSQL; broker: filesystem (messages just accumulate)."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    data_dir = tmp_path_factory.mktemp("service")
    # The tests' webhook receiver is on 127.0.0.1 and an ephemeral port: allowed here on purpose
    # (tests/service/test_webhook_targets.py shows the refusal with the guard on).
    settings = make_settings(
        data_dir, migrated_pg, max_upload_bytes=16 * 1024 * 1024, webhook_allow_private=True, webhook_ports="*"
    )
    with session_scope(migrated_pg) as session:
        key_a = create_key(session, tenant_name=f"tenant-a-{secrets.token_hex(3)}").key
        key_b = create_key(session, tenant_name=f"tenant-b-{secrets.token_hex(3)}").key
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield Service(settings, client, key_a, key_b)
    # Every module that used the service leaves no blob that no row names (issue 15: an upload that
    # failed after its bytes were stored left them behind).
    orphans = orphan_blobs(settings)
    assert not orphans, f"{len(orphans)} blob(s) in the store that no row references, e.g. {sorted(orphans)[:3]}"


@pytest.fixture
def receiver():
    WebhookReceiver.statuses, WebhookReceiver.received = [], []
    server = HTTPServer(("127.0.0.1", 0), WebhookReceiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", WebhookReceiver
    server.shutdown()
