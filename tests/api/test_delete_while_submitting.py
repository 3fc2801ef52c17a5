"""A DELETE of a dataset or model that races a job submit reading it: the submit's FOR SHARE row lock
makes the delete wait for the job row, which it then sees (409), so no job is ever queued on data that
is gone. Real PostgreSQL, the submit's transaction held open by hand between its read and its commit."""

from __future__ import annotations

import json
import threading

import pytest
from sqlalchemy import select

from core.models import list_builtin_models
from service.db import session_factory
from service.job_inputs import describe_data, resolve_model
from service.storage import get_store
from service.tables import Dataset, Job, Model, new_id
from tests.helpers.factories import BUILTIN_WEIGHTS, FMNIST_TIMM, auth, write_npz

FMNIST_ID = list_builtin_models()[0]["id"]


def _delete_in_background(service, path: str) -> tuple[threading.Thread, dict]:
    answer: dict = {}

    def delete() -> None:
        answer["response"] = service.client.delete(path, headers=auth(service.key_a))

    thread = threading.Thread(target=delete, daemon=True)
    thread.start()
    return thread, answer


def _queue_job(session, tenant_id: str, *, model_key: str, calibration: str) -> None:
    session.add(Job(id=new_id("job"), tenant_id=tenant_id, request={}, model_key=model_key, model_spec={},
                    config={}, calibration=calibration, request_hash="0" * 64))
    session.commit()


@pytest.mark.parametrize("kind", ["datasets", "models"])
def test_a_delete_waits_for_the_submit_reading_the_row_and_then_refuses(service, tmp_path, kind):
    settings = service.settings
    if kind == "datasets":
        npz = write_npz(tmp_path / "d.npz", n=8).read_bytes()
        upload = service.client.post("/v1/datasets", files={"file": ("d.npz", npz)}, headers=auth(service.key_a))
    else:
        upload = service.client.post(
            "/v1/models",
            files={"file": ("w.safetensors", BUILTIN_WEIGHTS.read_bytes())},
            data={"timm_name": FMNIST_TIMM["timm_name"], "timm_kwargs": json.dumps(FMNIST_TIMM["timm_kwargs"])},
            headers=auth(service.key_a),
        )
    assert upload.status_code == 201, upload.text
    row_id = upload.json()["id"]
    table = Dataset if kind == "datasets" else Model
    submit = session_factory(settings.resolved_database_url)()
    try:
        tenant_id = submit.scalar(select(table.tenant_id).where(table.id == row_id))
        submit.commit()
        if kind == "datasets":  # what create_job reads, in its transaction
            describe_data(submit, tenant_id=tenant_id, ref=row_id, role="calibration")
        else:
            resolve_model(submit, get_store(settings.resolved_storage_dir), tenant_id=tenant_id, ref=row_id,
                          cache_dir=settings.resolved_cache_dir)
        thread, answer = _delete_in_background(service, f"/v1/{kind}/{row_id}")
        thread.join(timeout=1.5)
        assert thread.is_alive(), f"the delete did not wait for the submit: {answer}"
        _queue_job(submit, tenant_id, model_key=row_id if kind == "models" else FMNIST_ID,
                   calibration=row_id if kind == "datasets" else "fashion-mnist:train:32")
    finally:
        submit.close()
    thread.join(timeout=30)
    response = answer["response"]
    assert response.status_code == 409, response.text
    assert response.json()["error"]["code"] == ("dataset_in_use" if kind == "datasets" else "model_in_use")
    assert service.client.get(f"/v1/{kind}/{row_id}", headers=auth(service.key_a)).status_code == 200
