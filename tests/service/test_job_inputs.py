"""service/job_inputs.py: a stored model spec (built-in or uploaded) and uploaded datasets (.npz,
ImageFolder .zip) turn back into what core runs on."""

from __future__ import annotations

import json

from service.archives import Limits
from service.db import session_scope
from service.job_inputs import data_path, spec_from_stored
from service.storage import get_store
from service.tables import Job
from tests.helpers.factories import BUILTIN_WEIGHTS, FMNIST_TIMM, auth, write_imagefolder_zip, write_npz
from tests.helpers.jobs import submit_job


def test_uploaded_model_and_datasets_materialize_for_core(service, tmp_path):
    from core import build_model, load_dataset

    with open(BUILTIN_WEIGHTS, "rb") as f:
        model = service.client.post(
            "/v1/models",
            files={"file": ("w.safetensors", f)},
            data={
                "timm_name": FMNIST_TIMM["timm_name"],
                "timm_kwargs": json.dumps(FMNIST_TIMM["timm_kwargs"]),
            },
            headers=auth(service.key_a),
        ).json()
    job_id = submit_job(service)
    with session_scope(service.settings.resolved_database_url) as session:
        stored = session.get(Job, job_id).model_spec
    store = get_store(service.settings.resolved_storage_dir)
    upload_spec = {
        "kind": "upload",
        "id": model["id"],
        "sha256": model["sha256"],
        "timm_name": model["timm_name"],
        "timm_kwargs": model["timm_kwargs"],
        "preprocess": None,
    }
    for spec_dict in (stored, upload_spec):
        spec = spec_from_stored(spec_dict, store, service.settings.resolved_cache_dir)
        assert sum(p.numel() for p in build_model(spec).parameters()) == 5353738
    limits = Limits(max_members=1000, max_bytes=10**8)
    for path in (write_npz(tmp_path / "m.npz", n=10), write_imagefolder_zip(tmp_path / "m.zip", n=10)):
        with open(path, "rb") as f:
            ds = service.client.post(
                "/v1/datasets", files={"file": (path.name, f)}, headers=auth(service.key_a)
            )
        with session_scope(service.settings.resolved_database_url) as session:
            local = data_path(
                session,
                store,
                ref=ds.json()["id"],
                cache_dir=service.settings.resolved_cache_dir,
                limits=limits,
            )
        assert len(load_dataset(local, spec.preprocess)) == 10
