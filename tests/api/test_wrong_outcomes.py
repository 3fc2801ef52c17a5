"""Issue 19's 5xx and wrong outcomes, on PostgreSQL and SQLite (the in-process API, real threads):
cancel racing DELETE answers 404/409, never 500; max_active_jobs holds under concurrent submits (row
locks are no-ops on SQLite: eight submits against a limit of 3 all got 202); every size, depth and
non-finite number inside timm_kwargs is a 422 naming the field, never a 500 or an allocation."""

from __future__ import annotations

import secrets
import threading

import pytest
from sqlalchemy import text

from service.db import session_scope
from service.keys import create_key
from tests.helpers import Service, make_settings
from tests.helpers.factories import auth

JOB = {"model": "fmnist-vit-tiny", "w_bits": 4, "a_bits": 4, "calibration": "fashion-mnist:train:32"}
LIMIT = 3


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def both(request, tmp_path_factory, migrated_pg):
    from fastapi.testclient import TestClient

    import migrations
    from api.app import create_app

    data_dir = tmp_path_factory.mktemp(request.param)
    url = migrated_pg if request.param == "postgresql" else f"sqlite:///{data_dir / 'vitq.db'}"
    if request.param == "sqlite":
        migrations.upgrade(url)
    settings = make_settings(data_dir, url, max_active_jobs=LIMIT)
    with session_scope(url) as session:
        key_a = create_key(session, tenant_name=f"wrong-a-{secrets.token_hex(3)}").key
        key_b = create_key(session, tenant_name=f"wrong-b-{secrets.token_hex(3)}").key
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield Service(settings, client, key_a, key_b)


def _at_once(*calls):
    results: list = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i, call):
        barrier.wait()
        results[i] = call()

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def _end_active(service):
    with session_scope(service.settings.resolved_database_url) as session:
        session.execute(text("UPDATE jobs SET status = 'cancelled' WHERE status IN ('queued', 'running')"))


def test_cancel_racing_delete_answers_404_or_409_never_500(both):
    client, headers = both.client, auth(both.key_a)
    seen = set()
    for _ in range(12):
        _end_active(both)
        job = client.post("/v1/jobs", json=JOB, headers=headers).json()["id"]
        path = f"/v1/jobs/{job}"
        cancel, delete, again = _at_once(lambda p=path: client.post(f"{p}/cancel", headers=headers),
                                         lambda p=path: client.delete(p, headers=headers),
                                         lambda p=path: client.delete(p, headers=headers))
        assert cancel.status_code in (202, 404, 409), cancel.text
        assert sorted([delete.status_code, again.status_code]) == [204, 404], (delete.text, again.text)
        seen.add(cancel.status_code)
    assert client.get("/healthz").status_code == 200
    print(f"cancel answers seen: {sorted(seen)}")


def test_max_active_jobs_holds_under_concurrent_submits(both):
    client = both.client
    for _ in range(3):
        _end_active(both)
        answers = _at_once(*[lambda: client.post("/v1/jobs", json=JOB, headers=auth(both.key_b))] * 8)
        codes = sorted(r.status_code for r in answers)
        assert codes == [202] * LIMIT + [429] * (8 - LIMIT), codes
    _end_active(both)


@pytest.mark.parametrize("kwargs, field", [
    ({"in_chans": 20_000_000}, "in_chans"), ({"in_chans": 0}, "in_chans"), ({"num_classes": 0}, "num_classes"),
    ({"num_classes": -1}, "num_classes"), ({"img_size": "abc"}, "img_size"), ({"img_size": 2.5}, "img_size"),
    ({"img_size": [28, 28, 28]}, "img_size"), ({"img_size": {"a": 1}}, "img_size"),
    ({"in_chans": [1, 2, 3]}, "in_chans"),
    ({"embed_dim": 10**9}, "embed_dim"), ({"mlp_ratio": 1e6}, "mlp_ratio"), ({"window_size": [7] * 100}, "window_size"),
])
def test_sizes_named_by_a_request_are_bounded_before_anything_is_built(both, kwargs, field):
    body = {**JOB, "model": {"timm_name": "vit_tiny_patch16_224", "timm_kwargs": {"patch_size": 4, **kwargs},
                      "weights": "random"}}
    response = both.client.post("/v1/jobs", json=body, headers=auth(both.key_a))
    assert response.status_code == 422 and f"timm_kwargs.{field}" in response.json()["error"]["message"], response.text


def test_deep_or_non_finite_timm_kwargs_are_422_on_jobs_and_models(both):
    deep: object = 1
    for _ in range(300):
        deep = [deep]
    body = {**JOB, "model": {"timm_name": "vit_tiny_patch16_224", "timm_kwargs": {"x": deep}, "weights": "random"}}
    response = both.client.post("/v1/jobs", json=body, headers=auth(both.key_a))
    assert response.status_code == 422 and "nested more than" in response.text, response.text
    raw = ('{"model":{"timm_name":"vit_tiny_patch16_224","timm_kwargs":{"drop_rate":1e400}},'
           '"w_bits":4,"a_bits":4,"calibration":"fashion-mnist:train:32"}')
    response = both.client.post("/v1/jobs", content=raw,
                                headers={**auth(both.key_a), "content-type": "application/json"})
    assert response.status_code == 422 and "finite" in response.text, response.text
    for form in ("[" * 5000 + "]" * 5000, '{"a":' * 900 + "1" + "}" * 900, '{"img_size":"abc"}',
                 '{"in_chans":[1,2,3]}', '{"drop_rate":1e400}'):
        response = both.client.post("/v1/models", files={"file": ("w.safetensors", b"x" * 100)},
                                    data={"timm_name": "vit_tiny_patch16_224", "timm_kwargs": form},
                                    headers=auth(both.key_a))
        assert response.status_code == 422, (form[:30], response.text)
