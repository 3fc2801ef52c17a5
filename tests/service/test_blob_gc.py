"""Deletion and retention (service/blob_gc.py, worker/retention.py) in-process over PostgreSQL: a blob is
removed with the last row that names it (any tenant's) and never while another row needs it."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from datetime import timedelta

from core.data import sha256_file
from service import blob_gc
from service.db import session_scope
from service.storage import get_store
from service.tables import Dataset, utcnow
from tests.helpers.factories import BUILTIN_WEIGHTS, FMNIST_TIMM, auth, write_npz
from tests.helpers.jobs import SMOKE, set_job_row, submit_job
from worker.retention import retention_pass
from worker.runner import run_job


def _blob(service, sha: str):
    return service.settings.resolved_storage_dir / sha[:2] / sha


def _upload(service, key: str, path):
    with open(path, "rb") as f:
        response = service.client.post("/v1/datasets", files={"file": (path.name, f)}, headers=auth(key))
    assert response.status_code == 201, response.text
    return response.json()


def _unique_npz(tmp_path, name="d.npz"):
    # bytes no other test uploads: the database (and so the reference count) is shared by the session
    return write_npz(tmp_path / name, n=24, offset=secrets.randbelow(9000))


def test_two_tenants_share_one_blob_and_it_goes_with_the_last_row(service, tmp_path):
    npz = _unique_npz(tmp_path)
    a, b = _upload(service, service.key_a, npz), _upload(service, service.key_b, npz)
    assert a["sha256"] == b["sha256"] and a["id"] != b["id"]
    blob = _blob(service, a["sha256"])
    assert service.client.delete(f"/v1/datasets/{a['id']}", headers=auth(service.key_a)).status_code == 204
    assert blob.is_file() and sha256_file(blob) == b["sha256"]  # tenant B still needs it
    job = service.client.post("/v1/jobs", json=SMOKE | {"evaluation": b["id"]}, headers=auth(service.key_b))
    assert job.status_code == 202, job.text
    in_use = service.client.delete(f"/v1/datasets/{b['id']}", headers=auth(service.key_b))
    assert in_use.status_code == 409 and in_use.json()["error"]["code"] == "dataset_in_use"
    service.client.post(f"/v1/jobs/{job.json()['id']}/cancel", headers=auth(service.key_b))
    assert service.client.delete(f"/v1/datasets/{b['id']}", headers=auth(service.key_b)).status_code == 204
    assert not blob.exists()
    assert service.client.get(f"/v1/datasets/{b['id']}", headers=auth(service.key_b)).status_code == 404


def test_model_delete_is_refused_while_a_job_uses_it(service):
    with open(BUILTIN_WEIGHTS, "rb") as f:
        model = service.client.post(
            "/v1/models",
            files={"file": ("w.safetensors", f)},
            data={"timm_name": FMNIST_TIMM["timm_name"], "timm_kwargs": '{"img_size": 28, "patch_size": 4, '
                  '"in_chans": 1, "num_classes": 10}'},
            headers=auth(service.key_a),
        ).json()
    job_id = submit_job(service, model=model["id"])
    refused = service.client.delete(f"/v1/models/{model['id']}", headers=auth(service.key_a))
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "model_in_use"
    assert service.client.delete(f"/v1/models/{model['id']}", headers=auth(service.key_b)).status_code == 404
    builtin = service.client.delete("/v1/models/fmnist-vit-tiny", headers=auth(service.key_a))
    assert builtin.status_code == 409 and builtin.json()["error"]["code"] == "builtin_model"
    service.client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(service.key_a))
    assert service.client.delete(f"/v1/models/{model['id']}", headers=auth(service.key_a)).status_code == 204
    assert service.client.get(f"/v1/models/{model['id']}", headers=auth(service.key_a)).status_code == 404


def _dataset_row(tenant_id: str, sha: str, size: int) -> Dataset:
    return Dataset(id=f"ds_{secrets.token_hex(8)}", tenant_id=tenant_id, filename="x.npz", format="npz",
                   sha256=sha, size_bytes=size, n=1, image_shape=[1, 28, 28], has_labels=False)


def _tenant_id(service, key: str) -> str:
    return service.client.get("/v1/tenant", headers=auth(key)).json()["id"]


def test_a_blob_collected_while_it_was_being_recorded_is_stored_again(service, tmp_path):
    """Writer B finds the blob present (no copy), then A's delete collects it before B records its row:
    B's hold sees the file gone and stores it again, so B's row never points at nothing."""
    url = service.settings.resolved_database_url
    store = get_store(service.settings.resolved_storage_dir)
    source = tmp_path / "bytes"
    source.write_bytes(secrets.token_bytes(4096))
    sha, size = store.put_file(source)
    with session_scope(url) as session:
        row_a = _dataset_row(_tenant_id(service, service.key_a), sha, size)
        session.add(row_a)
    assert store.put_file(source) == (sha, size)  # writer B: the blob exists, nothing is copied
    with session_scope(url) as session:  # tenant A deletes its row; nothing else names the blob yet
        session.delete(session.get(Dataset, row_a.id))
    with session_scope(url) as session:
        assert blob_gc.release(session, store, [sha]) == [sha]
    assert not store.exists(sha)
    with session_scope(url) as session:  # writer B records its row
        blob_gc.hold(session, store, {sha: source})
        session.add(_dataset_row(_tenant_id(service, service.key_b), sha, size))
    assert store.exists(sha) and sha256_file(store.local_path(sha)) == sha


def test_release_waits_for_a_writer_holding_the_blob(service, tmp_path):
    """The collector blocks on the writer's lock, then counts the writer's row and keeps the blob."""
    url = service.settings.resolved_database_url
    store = get_store(service.settings.resolved_storage_dir)
    source = tmp_path / "bytes"
    source.write_bytes(secrets.token_bytes(4096))
    outcome: dict[str, object] = {}
    with session_scope(url) as writer:
        sha, size = blob_gc.store_and_hold(writer, store, source)

        def collect() -> None:
            started = time.monotonic()
            with session_scope(url) as session:
                outcome["removed"] = blob_gc.release(session, store, [sha])
            outcome["waited_s"] = time.monotonic() - started

        collector = threading.Thread(target=collect)
        collector.start()
        time.sleep(0.8)
        assert collector.is_alive()  # waiting for the writer's lock
        writer.add(_dataset_row(_tenant_id(service, service.key_a), sha, size))
    collector.join(timeout=10)
    assert outcome["removed"] == [] and outcome["waited_s"] >= 0.7
    assert store.exists(sha)


def _download_sha(service, job_id: str, name: str) -> str:
    response = service.client.get(f"/v1/jobs/{job_id}/artifacts/{name}", headers=auth(service.key_a))
    assert response.status_code == 200, response.text
    return hashlib.sha256(response.content).hexdigest()


def test_jobs_sharing_a_blob_deletion_and_retention(service, monkeypatch):
    """Two identical jobs store one checkpoint blob. Retention expires the first (row kept,
    ``artifacts_expired``), the second's download still matches its sha256; deleting the second removes
    the blob from disk."""
    seed = secrets.randbelow(10_000)  # a checkpoint no other test's job has
    ids = [submit_job(service, method="repq", options={"seed": seed}) for _ in range(2)]
    for job_id in ids:
        assert run_job(service.settings, job_id) == "succeeded"
    jobs = [service.client.get(f"/v1/jobs/{j}", headers=auth(service.key_a)).json() for j in ids]
    sha = jobs[0]["result"]["checkpoint_sha256"]
    assert jobs[1]["result"]["checkpoint_sha256"] == sha
    blob = _blob(service, sha)
    assert blob.is_file()

    set_job_row(service, ids[0], finished_at=utcnow() - timedelta(days=3))
    monkeypatch.setattr(service.settings, "retention_days", 2.0)
    passed = retention_pass(service.settings)
    assert ids[0] in passed["expired"] and ids[1] not in passed["expired"]
    expired = service.client.get(f"/v1/jobs/{ids[0]}", headers=auth(service.key_a)).json()
    assert expired["artifacts_expired"] is True and expired["status"] == "succeeded"
    assert service.client.get(f"/v1/jobs/{ids[0]}/artifacts", headers=auth(service.key_a)).json()["data"] == []
    assert blob.is_file() and _download_sha(service, ids[1], "checkpoint.safetensors") == sha
    assert ids[0] not in retention_pass(service.settings)["expired"]  # once

    assert service.client.delete(f"/v1/jobs/{ids[0]}", headers=auth(service.key_a)).status_code == 204
    assert _download_sha(service, ids[1], "checkpoint.safetensors") == sha
    others = [a["sha256"] for a in
              service.client.get(f"/v1/jobs/{ids[1]}/artifacts", headers=auth(service.key_a)).json()["data"]]
    assert service.client.delete(f"/v1/jobs/{ids[1]}", headers=auth(service.key_b)).status_code == 404
    assert service.client.delete(f"/v1/jobs/{ids[1]}", headers=auth(service.key_a)).status_code == 204
    assert service.client.get(f"/v1/jobs/{ids[1]}", headers=auth(service.key_a)).status_code == 404
    assert not blob.exists() and not any(_blob(service, s).exists() for s in others)
