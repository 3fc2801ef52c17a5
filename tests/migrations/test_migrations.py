"""Alembic is the only way the schema is made: migrations and the SQLAlchemy models must agree."""

from __future__ import annotations

import secrets
from datetime import datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.orm import Session

import migrations
from service.quotas import storage_bytes
from service.tables import Base, Dataset, Model
from tests.helpers import PG_ADMIN_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
        return
    name = f"vitq_migr_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_models_and_migrations_agree(empty_database):
    migrations.upgrade(empty_database)
    engine = create_engine(empty_database)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert diff == [], diff
            tables = set(inspect(conn).get_table_names())
        assert set(Base.metadata.tables) <= tables
        migrations.downgrade(empty_database, "base")
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
        migrations.upgrade(empty_database)  # and up again
    finally:
        engine.dispose()


def test_files_of_2_gib_and_more_record_their_size_and_count_against_the_quota(empty_database):
    """A 32-bit size column overflowed on PostgreSQL for a 2 GiB checkpoint (a 500 after the bytes were
    stored); 0003 widens it, keeping the rows 0002 already held."""
    migrations.upgrade(empty_database, "0002")
    engine = create_engine(empty_database)
    five_gib = 5 * 1024**3
    try:
        with engine.begin() as conn:
            conn.execute(
                text("INSERT INTO tenants (id, name, webhook_secret, created_at) VALUES ('t1', 'a', 's', :at)"),
                {"at": datetime(2026, 12, 1)},
            )
            conn.execute(
                text(
                    "INSERT INTO models (id, tenant_id, filename, timm_name, timm_kwargs, sha256, size_bytes,"
                    " created_at) VALUES ('m1', 't1', 'vit_h.safetensors', 'vit_huge_patch14_224', '{}',"
                    " :sha, 1000, :at)"
                ),
                {"sha": "a" * 64, "at": datetime(2026, 12, 1)},
            )
        migrations.upgrade(empty_database)
        with Session(engine) as session:
            model = session.get(Model, "m1")
            assert model is not None and model.size_bytes == 1000  # the 0002 row survived the upgrade
            model.size_bytes = five_gib
            session.add(
                Dataset(
                    id="d1",
                    tenant_id="t1",
                    filename="calib.tar",
                    format="tar",
                    sha256="b" * 64,
                    size_bytes=five_gib,
                    n=1_281_167,
                    image_shape=[3, 224, 224],
                    has_labels=True,
                )
            )
            session.commit()
        with Session(engine) as session:
            assert session.get(Model, "m1").size_bytes == five_gib
            assert storage_bytes(session, "t1") == 2 * five_gib
    finally:
        engine.dispose()
