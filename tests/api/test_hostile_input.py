"""Issue 15's reproductions, each against the real app (PostgreSQL, the in-process API): what a careless
user or an attacker sent, and the clear 4xx in the error format it now gets, with nothing stored.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import socket
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from api.app import create_app
from service.db import session_scope
from service.storage import get_store
from service.tables import Artifact
from tests.helpers.blobs import orphan_blobs, store_blobs
from tests.helpers.factories import BUILTIN_WEIGHTS, FMNIST_TIMM, auth, png_bytes, write_npz

JOB = {
    "model": "fmnist-vit-tiny",
    "w_bits": 4,
    "a_bits": 4,
    "preset": "smoke",
    "calibration": "fashion-mnist:train:32",
}


def _error(response, status: int, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return error["message"]


def _upload(service, name: str, data: bytes):
    return service.client.post("/v1/datasets", files={"file": (name, data)}, headers=auth(service.key_a))


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _no_server_details(service, message: str) -> None:
    settings = service.settings
    for leak in (str(settings.data_dir.resolve()), str(settings.resolved_cache_dir), "upload-",
                 socket.gethostname(), f"-{os.getpid()}-", "/tmp/"):
        assert leak not in message, (leak, message)


# -- 1. labels outside the database's integer range: a 500 and an orphan blob ------------------------


@pytest.mark.parametrize(
    "labels",
    [
        np.array([0] * 7 + [2**63 - 1], np.int64),
        np.array([0] * 7 + [2**64 - 1], np.uint64),
        np.array([0] * 7 + [2**31], np.int64),  # above PostgreSQL's INTEGER
        np.array([0] * 7 + [100_000], np.int32),
    ],
    ids=["int64-max", "uint64-max", "int32-overflow", "100k-classes"],
)
def test_labels_out_of_range_are_refused_before_anything_is_stored(service, labels):
    before = store_blobs(service.settings.resolved_storage_dir)
    response = _upload(service, "labels.npz", _npz(x=np.zeros((8, 28, 28), np.uint8), y=labels))
    message = _error(response, 422, "invalid_dataset")
    assert "out of range" in message and str(int(labels.max())) in message
    assert store_blobs(service.settings.resolved_storage_dir) == before
    assert not orphan_blobs(service.settings)


def test_labels_beyond_the_models_classes_are_refused_for_a_job(service):
    body = _upload(service, "many.npz", _npz(x=np.zeros((8, 28, 28), np.uint8), y=np.arange(8) * 200)).json()
    assert body["num_classes"] == 1401
    timm_1000 = {"timm_name": "vit_tiny_patch16_224", "weights": "random",
                 "timm_kwargs": {"img_size": 28, "patch_size": 4, "in_chans": 1}}  # 1000 classes
    response = service.client.post(
        "/v1/jobs", json={**JOB, "model": timm_1000, "evaluation": body["id"]}, headers=auth(service.key_a)
    )
    assert "1401 classes but the model predicts 1000" in _error(response, 422, "invalid_dataset")


# -- 2. a model check that cost a minute ------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"depth": 3000}, "3000 transformer blocks; the limit is 128"),
        ({"depth": 2000}, "2000 transformer blocks"),
        ({"depth": 120, "embed_dim": 1024, "num_heads": 16}, "the limit is 400,000,000"),  # 1.5 B, 120 blocks
        ({"depth": "12"}, "depth must be a non-negative integer"),
    ],
)
def test_huge_models_are_refused_in_bounded_time(service, kwargs, fragment):
    started = time.process_time()
    response = service.client.post(
        "/v1/jobs",
        json={**JOB, "model": {"timm_name": "vit_tiny_patch16_224", "timm_kwargs": kwargs}},
        headers=auth(service.key_a),
    )
    spent = time.process_time() - started
    assert fragment in _error(response, 422, "invalid_model")
    assert spent < 3, f"the model check took {spent:.1f} s of CPU"


def test_a_deep_model_within_the_limit_is_counted_without_being_built(service):
    started = time.process_time()
    response = service.client.post(  # 120 blocks of ViT-Tiny: 64 M parameters, 2.6 s to build on meta
        "/v1/jobs",
        json={**JOB, "model": {"timm_name": "vit_tiny_patch16_224", "weights": "random",
                               "timm_kwargs": {"depth": 120}}},
        headers=auth(service.key_a),
    )
    assert response.status_code == 202, response.text
    assert time.process_time() - started < 1.5


# -- 3. an outbound download from the API -----------------------------------------------------------


@pytest.mark.parametrize("value", [True, "yes", 1])
def test_pretrained_is_refused_at_once(service, value):
    started = time.monotonic()
    response = service.client.post(
        "/v1/jobs",
        json={**JOB, "model": {"timm_name": "deit_tiny_patch16_224", "timm_kwargs": {"pretrained": value}}},
        headers=auth(service.key_a),
    )
    message = _error(response, 422, "invalid_model")
    assert "timm name or hub id means its pretrained weights" in message and '"weights": "random"' in message
    assert time.monotonic() - started < 2
    upload = service.client.post(
        "/v1/models",
        files={"file": ("w.safetensors", BUILTIN_WEIGHTS.read_bytes())},
        data={"timm_name": FMNIST_TIMM["timm_name"],
              "timm_kwargs": json.dumps({**FMNIST_TIMM["timm_kwargs"], "pretrained": value})},
        headers=auth(service.key_a),
    )
    assert "timm_kwargs.pretrained is not taken" in _error(upload, 422, "invalid_model")


def test_the_api_process_has_the_hub_offline(service):
    import huggingface_hub.constants

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True


# -- 4. server paths, host names and pids in messages -----------------------------------------------


def test_messages_name_the_upload_by_its_client_filename(service):
    message = _error(_upload(service, "my-images.npz", _npz(x=np.zeros((4, 0, 28), np.uint8))), 422)
    assert message.startswith("my-images.npz: x holds no images"), message
    _no_server_details(service, message)
    broken = io.BytesIO()
    with zipfile.ZipFile(broken, "w") as zf:
        zf.writestr("cls/a.png", b"\x89PNG\r\n\x1a\n not really")
        zf.writestr("cls/b.png", png_bytes(np.zeros((8, 8), np.uint8)))
    message = _error(_upload(service, "photos.zip", broken.getvalue()), 422, "invalid_dataset")
    assert "cls/a.png" in message
    _no_server_details(service, message)


def test_a_member_name_that_is_not_utf8_gets_a_422_not_a_500(service):
    """Found by the upload fuzzer (long profile): a tar member named in latin-1 reached the message as a
    lone surrogate, and rendering the JSON body raised."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
        for name, data in (("c0/a.png", png_bytes(np.zeros((6, 6), np.uint8))), ("ü/a.png", b"not a png")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    message = _error(_upload(service, "data.tar", buf.getvalue()), 422, "invalid_dataset")
    assert "image does not decode: \ufffd/a.png" in message, message


# -- 6. forged cursors ------------------------------------------------------------------------------


@pytest.mark.parametrize("cursor", ["garbage", "zzzz", "job_", "job_ZZZZZZZZZZZZZZZZZZZZZZZZ", "' OR 1=1 --", ""])
def test_a_forged_cursor_gets_400(service, cursor):
    response = service.client.get("/v1/jobs", params={"cursor": cursor}, headers=auth(service.key_a))
    assert "next_cursor" in _error(response, 400, "invalid_cursor")


# -- 7. HTTP details --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(service, tmp_path_factory):
    job = service.client.post("/v1/jobs", json=JOB, headers=auth(service.key_a)).json()
    data = tmp_path_factory.mktemp("artifact") / "report.json"
    data.write_bytes(json.dumps({"n": list(range(400))}).encode())
    sha, size = get_store(service.settings.resolved_storage_dir).put_file(data)
    with session_scope(service.settings.resolved_database_url) as session:
        session.add(Artifact(job_id=job["id"], name="report.json", sha256=sha, size_bytes=size,
                             content_type="application/json"))
    return f"/v1/jobs/{job['id']}/artifacts/report.json", sha, data.read_bytes()


def test_head_on_a_download_gives_its_headers(service, artifact):
    url, sha, data = artifact
    response = service.client.head(url, headers=auth(service.key_a))
    assert response.status_code == 200 and response.content == b""
    assert response.headers["etag"] == f'"{sha}"' and int(response.headers["content-length"]) == len(data)
    assert service.client.head(url + "x", headers=auth(service.key_a)).status_code == 404


@pytest.mark.parametrize("value", ["*", 'W/"{sha}"', '"other", W/"{sha}"', '"{sha}"'])
def test_if_none_match_star_and_weak_validators(service, artifact, value):
    url, sha, _ = artifact
    response = service.client.get(url, headers=auth(service.key_a) | {"If-None-Match": value.format(sha=sha)})
    assert response.status_code == 304 and response.headers["etag"] == f'"{sha}"'
    other = service.client.get(url, headers=auth(service.key_a) | {"If-None-Match": '"nope"'})
    assert other.status_code == 200


@pytest.mark.parametrize("value", ["bytes", "bytes=", "bytes=abc", "items=0-1", "bytes=5-2", "bytes=--1"])
def test_a_malformed_range_is_ignored(service, artifact, value):
    url, _, data = artifact
    response = service.client.get(url, headers=auth(service.key_a) | {"Range": value})
    assert response.status_code == 200 and response.content == data


def test_ranges(service, artifact):
    url, _, data = artifact
    h = auth(service.key_a)
    part = service.client.get(url, headers=h | {"Range": "bytes=2-9"})
    assert part.status_code == 206 and part.content == data[2:10]
    tail = service.client.get(url, headers=h | {"Range": f"bytes={len(data) + 5}-, 0-3"})
    assert tail.status_code == 206 and tail.content == data[:4]  # the satisfiable one of the two
    outside = service.client.get(url, headers=h | {"Range": f"bytes={len(data)}-"})
    assert "outside" in _error(outside, 416, "range_not_satisfiable")
    assert outside.headers["content-range"] == f"bytes */{len(data)}"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          "application/xml", None])
def test_a_json_endpoint_given_another_content_type_answers_415(service, content_type):
    headers = auth(service.key_a) | ({"Content-Type": content_type} if content_type else {})
    response = service.client.post("/v1/jobs", content=json.dumps(JOB).encode(), headers=headers)
    assert "application/json" in _error(response, 415, "unsupported_media_type")
    ok = service.client.post("/v1/jobs", content=json.dumps(JOB).encode(),
                             headers=auth(service.key_a) | {"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 202, ok.text


@pytest.mark.parametrize("body", [b"{not json", b'{"w_bits": 4,', b"\xff\xfe", b"   "])
def test_a_body_that_is_not_json_answers_400(service, body):
    response = service.client.post("/v1/jobs", content=body,
                                   headers=auth(service.key_a) | {"Content-Type": "application/json"})
    assert _error(response, 400, "invalid_json").startswith("body is not valid JSON")


@pytest.mark.parametrize(
    "body",
    [
        '{"options": {"lr": NaN}}',
        '{"options": {"lr": Infinity}}',
        '{"model": {"timm_name": "vit_tiny_patch16_224", "timm_kwargs": {"drop_rate": -Infinity}}}',
    ],
)
def test_nan_and_infinity_are_refused(service, body):
    merged = json.dumps(JOB)[:-1] + ", " + body[1:]
    response = service.client.post("/v1/jobs", content=merged.encode(),
                                   headers=auth(service.key_a) | {"Content-Type": "application/json"})
    assert "not valid JSON" in _error(response, 400, "invalid_json")
    form = service.client.post(
        "/v1/models",
        files={"file": ("w.safetensors", BUILTIN_WEIGHTS.read_bytes())},
        data={"timm_name": FMNIST_TIMM["timm_name"], "timm_kwargs": '{"img_size": 28, "drop_rate": NaN}'},
        headers=auth(service.key_a),
    )
    assert "NaN is not valid JSON" in _error(form, 422, "invalid_request")


def test_two_file_fields_in_one_upload_are_refused(service, tmp_path):
    before = store_blobs(service.settings.resolved_storage_dir)
    good = write_npz(tmp_path / "a.npz", n=8).read_bytes()
    response = service.client.post(
        "/v1/datasets",
        files=[("file", ("a.npz", good)), ("file", ("b.npz", _npz(x=np.zeros((2, 3), np.uint8))))],
        headers=auth(service.key_a),
    )
    assert "'file'" in _error(response, 400, "duplicate_field")
    assert store_blobs(service.settings.resolved_storage_dir) == before


@pytest.mark.parametrize("name, stored", [("..", "dataset"), ("../../etc/passwd", "passwd"),
                                          (".hidden.npz", "hidden.npz"), ("a b/..\\c.npz", "c.npz")])
def test_uploaded_filenames_are_stored_sanitised(service, tmp_path, name, stored):
    data = write_npz(tmp_path / "d.npz", n=4, offset=int.from_bytes(name.encode()[:2], "big") % 900).read_bytes()
    response = _upload(service, name, data)
    assert response.status_code == 201, response.text
    assert response.json()["filename"] == stored


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, "false"])
def test_booleans_are_strict(service, value):
    response = service.client.post("/v1/jobs", json={**JOB, "options": {"sos": value}}, headers=auth(service.key_a))
    assert "options.sos" in _error(response, 422, "invalid_request")
    assert service.client.post("/v1/jobs", json={**JOB, "options": {"sos": False}},
                               headers=auth(service.key_a)).status_code == 202


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"class_token": "no"}, "timm_kwargs.class_token must be true or false for VisionTransformer, not 'no'"),
        ({"mlp_ratio": "4"}, "timm_kwargs.mlp_ratio must be a number"),
        ({"global_pool": "mean"}, "timm_kwargs.global_pool must be one of"),
        ({"img_size": ["28", "28"]}, "timm_kwargs.img_size must be an integer or a list"),
    ],
)
def test_timm_kwargs_of_the_wrong_json_type_are_refused_not_taken_as_truthy(service, kwargs, fragment):
    response = service.client.post(
        "/v1/jobs",
        json={**JOB, "model": {"timm_name": "vit_tiny_patch16_224", "timm_kwargs": {"num_classes": 10, **kwargs}}},
        headers=auth(service.key_a),
    )
    assert fragment in _error(response, 422, "invalid_model")
    upload = service.client.post(
        "/v1/models",
        files={"file": ("w.safetensors", BUILTIN_WEIGHTS.read_bytes())},
        data={
            "timm_name": FMNIST_TIMM["timm_name"],
            "timm_kwargs": json.dumps({**FMNIST_TIMM["timm_kwargs"], **kwargs}),
        },
        headers=auth(service.key_a),
    )
    assert fragment.split(" for ")[0] in _error(upload, 422, "invalid_model")


def test_ids_echoed_in_messages_are_truncated(service):
    long_id = "job_" + "a" * 5000
    for path in (f"/v1/jobs/{long_id}", f"/v1/jobs/{long_id}/artifacts/x"):
        message = _error(service.client.get(path, headers=auth(service.key_a)), 404, "not_found")
        assert len(message) < 120 and "…" in message


# -- 8. logs and messages ---------------------------------------------------------------------------


def test_an_unhandled_error_is_one_json_500_and_one_traceback(service, caplog):
    app = create_app(service.settings)

    def boom() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/v1/boom", boom)
    with caplog.at_level(logging.ERROR), TestClient(app, raise_server_exceptions=True) as client:
        response = client.get("/v1/boom")  # before: the exception reached the server (which logged it again)
    assert _error(response, 500, "internal_error") == "internal server error"
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "a bug" in str(tracebacks[0].exc_info[1])


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def test_the_pickle_refusal_never_suggests_the_unsafe_path(service, tmp_path):
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"weight": _RunsCode()}, protocol=2))
    state = load_file(str(BUILTIN_WEIGHTS))
    import torch

    odd = tmp_path / "odd.pth"
    torch.save({"state_dict": state, "optimizer": {"step": Path("x")}}, odd)
    for path in (evil, odd):
        response = service.client.post(
            "/v1/models",
            files={"file": (path.name, path.read_bytes())},
            data={"timm_name": FMNIST_TIMM["timm_name"], "timm_kwargs": json.dumps(FMNIST_TIMM["timm_kwargs"])},
            headers=auth(service.key_a),
        )
        message = _error(response, 422, "invalid_checkpoint")
        assert "weights_only=True" in message
        assert "weights_only=False" not in message and "likely succeed" not in message
        assert "state dict of tensors, or as safetensors" in message
        if path is evil:
            assert "it references posix.system, which is not a tensor" in message
