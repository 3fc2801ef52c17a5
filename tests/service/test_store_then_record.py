"""``store_then_record``: the one path by which an upload's bytes and its row appear, on PostgreSQL. A
failure after the blob is written removes it, unless another row names the same bytes."""

from __future__ import annotations

import secrets

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from service.db import session_scope
from service.keys import create_key
from service.storage import LocalStore, store_then_record
from service.tables import Dataset, new_id
from tests.helpers.blobs import store_blobs


@pytest.fixture
def tenant_id(migrated_pg) -> str:
    with session_scope(migrated_pg) as session:
        key = create_key(session, tenant_name=f"store-{secrets.token_hex(3)}").key
    from service.keys import authenticate

    with session_scope(migrated_pg) as session:
        return authenticate(session, key=key).id


def _row(tenant_id: str, row_id: str | None = None):
    def make(sha: str, size: int) -> Dataset:
        return Dataset(id=row_id or new_id("ds"), tenant_id=tenant_id, filename="d.npz", format="npz", sha256=sha,
                       size_bytes=size, n=1, image_shape=[1, 2, 2], num_classes=1, has_labels=True)
    return make


def _blob(tmp_path, text: str):
    path = tmp_path / f"{secrets.token_hex(4)}.bin"
    path.write_text(text)
    return path


def test_a_recorded_upload_has_its_row_and_its_blob(migrated_pg, tmp_path, tenant_id):
    store = LocalStore(tmp_path / "store")
    with session_scope(migrated_pg) as session:
        row = store_then_record(session, store, _blob(tmp_path, "one"), _row(tenant_id))
        assert store_blobs(store.root) == {row.sha256}
        assert session.get(Dataset, row.id) is not None


def test_a_failed_insert_removes_the_blob_it_stored(migrated_pg, tmp_path, tenant_id):
    store = LocalStore(tmp_path / "store")
    taken = new_id("ds")
    with session_scope(migrated_pg) as session:
        store_then_record(session, store, _blob(tmp_path, "first"), _row(tenant_id, taken))
        before = store_blobs(store.root)
        session.expunge_all()
        with pytest.raises(IntegrityError):  # the same primary key: the database refuses the row
            store_then_record(session, store, _blob(tmp_path, "second"), _row(tenant_id, taken))
        assert store_blobs(store.root) == before
        assert session.scalars(select(Dataset.id).where(Dataset.tenant_id == tenant_id)).all() == [taken]


def test_a_bug_while_building_the_row_removes_the_blob(migrated_pg, tmp_path, tenant_id):
    store = LocalStore(tmp_path / "store")

    def broken(sha: str, size: int) -> Dataset:
        raise OverflowError("Python int too large to convert to SQLite INTEGER")

    with session_scope(migrated_pg) as session, pytest.raises(OverflowError):
        store_then_record(session, store, _blob(tmp_path, "bug"), broken)
    assert store_blobs(store.root) == set()


def test_a_failure_keeps_bytes_another_row_names(migrated_pg, tmp_path, tenant_id):
    store = LocalStore(tmp_path / "store")
    taken = new_id("ds")
    with session_scope(migrated_pg) as session:
        first = store_then_record(session, store, _blob(tmp_path, "shared"), _row(tenant_id, taken))
        sha = first.sha256
        session.expunge_all()
        with pytest.raises(IntegrityError):  # the same bytes, a row the database refuses
            store_then_record(session, store, _blob(tmp_path, "shared"), _row(tenant_id, taken))
        assert store_blobs(store.root) == {sha}
        assert store.local_path(sha).read_text() == "shared"


def test_two_concurrent_uploads_cannot_both_take_the_last_room_of_the_storage_quota(migrated_pg, tmp_path, tenant_id):
    """Both pass the early check (nothing stored yet); the check inside the recording transaction takes
    the tenant's lock, so the second waits for the first row to commit, counts it, and is refused."""
    import threading

    from service.quotas import QuotaExceeded, check_storage, set_limits, storage_bytes
    from service.tables import Tenant
    from tests.helpers import make_settings

    settings = make_settings(tmp_path / "data", migrated_pg)
    store = LocalStore(tmp_path / "store")
    with session_scope(migrated_pg) as session:
        set_limits(session, session.get(Tenant, tenant_id), max_storage_bytes=150)
    first_checked, let_first_commit = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def upload(name: str, text: str, hold: bool) -> None:
        with session_scope(migrated_pg) as session:
            tenant = session.get(Tenant, tenant_id)
            check_storage(session, settings, tenant, adding=len(text))  # the early check: both pass

            def make(sha: str, size: int) -> Dataset:
                if hold:  # the tenant lock is held from here to the commit
                    first_checked.set()
                    let_first_commit.wait(10)
                return _row(tenant_id)(sha, size)

            try:
                store_then_record(session, store, _blob(tmp_path, text), make,
                                  check=lambda: check_storage(session, settings, tenant, adding=len(text), lock=True))
                outcome[name] = "recorded"
            except QuotaExceeded as exc:
                outcome[name] = exc.message

    first = threading.Thread(target=upload, args=("first", "a" * 100, True))
    first.start()
    assert first_checked.wait(10)
    second = threading.Thread(target=upload, args=("second", "b" * 100, False))
    second.start()
    second.join(timeout=1.0)
    assert second.is_alive(), f"the second upload did not wait for the first: {outcome}"
    let_first_commit.set()
    first.join(10)
    second.join(10)
    assert outcome["first"] == "recorded"
    assert "keeps 100 bytes of uploads; 100 more would pass its limit of 150" in str(outcome["second"])
    with session_scope(migrated_pg) as session:
        assert storage_bytes(session, tenant_id) == 100
        (sha,) = session.scalars(select(Dataset.sha256).where(Dataset.tenant_id == tenant_id)).all()
    assert store_blobs(store.root) == {sha}  # the refused upload's blob is gone
