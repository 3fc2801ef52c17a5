"""Dataset and model uploads: accepted when valid, a clear 4xx otherwise, and nothing left behind."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.factories import (
    BUILTIN_WEIGHTS,
    FMNIST_TIMM,
    auth,
    png_bytes,
    tar_member,
    tar_with,
    write_imagefolder_tar,
    write_imagefolder_zip,
    write_npz,
)


def _upload(service, path: Path, key: str | None = None, name: str | None = None):
    with open(path, "rb") as f:
        return service.client.post(
            "/v1/datasets", files={"file": (name or path.name, f)}, headers=auth(key or service.key_a)
        )


def _store_files(service) -> set[str]:
    root = service.settings.resolved_storage_dir
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _scratch_files(service) -> list[Path]:
    uploads = service.settings.resolved_cache_dir / "uploads"
    return [p for p in uploads.rglob("*")] if uploads.exists() else []


@pytest.mark.parametrize("kind", ["npz", "zip", "tar.gz"])
def test_valid_dataset_uploads(service, tmp_path, kind):
    path = {
        "npz": lambda: write_npz(tmp_path / "d.npz", n=40),
        "zip": lambda: write_imagefolder_zip(tmp_path / "d.zip", n=20),
        "tar.gz": lambda: write_imagefolder_tar(tmp_path / "d.tar.gz", n=20),
    }[kind]()
    response = _upload(service, path)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"].startswith("ds_") and response.headers["location"] == f"/v1/datasets/{body['id']}"
    assert body["n"] == (40 if kind == "npz" else 20)
    assert body["has_labels"] is True
    assert body["image_shape"] == [1, 28, 28]
    assert service.client.get(f"/v1/datasets/{body['id']}", headers=auth(service.key_a)).json() == body
    assert body["id"] in [
        d["id"] for d in service.client.get("/v1/datasets", headers=auth(service.key_a)).json()["data"]
    ]
    assert service.client.get(f"/v1/datasets/{body['id']}", headers=auth(service.key_b)).status_code == 404
    assert not _scratch_files(service)


def _zip_with(path: Path, entries: dict[str, bytes], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, "/etc/passwd")
    return path


def _bad_datasets(tmp: Path) -> dict[str, tuple[Path, str]]:
    image = png_bytes(np.zeros((28, 28), np.uint8))
    good_zip = write_imagefolder_zip(tmp / "good.zip", n=4).read_bytes()
    npz_obj = tmp / "obj.npz"
    np.savez(npz_obj, x=np.array([{"a": 1}], dtype=object))
    npz_bad_y = tmp / "bad_y.npz"
    np.savez(npz_bad_y, x=np.zeros((4, 28, 28), np.uint8), y=np.array([0, 1]))
    npz_float_y = tmp / "float_y.npz"
    np.savez(npz_float_y, x=np.zeros((4, 28, 28), np.uint8), y=np.zeros(4, np.float32))
    npz_no_x = tmp / "no_x.npz"
    np.savez(npz_no_x, images=np.zeros((4, 28, 28), np.uint8))
    npz_nan = tmp / "nan.npz"
    np.savez(npz_nan, x=np.full((2, 1, 28, 28), np.nan, np.float32))
    (tmp / "truncated.zip").write_bytes(good_zip[: len(good_zip) // 2])
    (tmp / "garbage.npz").write_bytes(b"this is not a zip file at all")
    (tmp / "notes.txt").write_bytes(b"hello")
    bomb = tmp / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("class_0/big.png", b"\0" * (3 * 1024 * 1024))
    many = tmp / "many.tar"
    tar_with(many, [tar_member(f"c/{i}.png") for i in range(60)], payload=image)
    truncated_tgz = tmp / "truncated.tar.gz"
    write_imagefolder_tar(tmp / "full.tar.gz", n=10)
    truncated_tgz.write_bytes((tmp / "full.tar.gz").read_bytes()[:300])
    return {
        "absolute path (tar)": (tar_with(tmp / "abs.tar", [tar_member("/tmp/evil.png")], image), "absolute"),
        "dot-dot (tar)": (tar_with(tmp / "dotdot.tar", [tar_member("c/../../evil.png")], image), ".."),
        "symlink (tar)": (
            tar_with(tmp / "sym.tar", [tar_member("c/link.png", tarfile.SYMTYPE, "/etc/passwd")]),
            "link",
        ),
        "hardlink (tar)": (
            tar_with(tmp / "hard.tar", [tar_member("c/link.png", tarfile.LNKTYPE, "/etc/passwd")]),
            "link",
        ),
        "device (tar)": (tar_with(tmp / "dev.tar", [tar_member("c/dev", tarfile.CHRTYPE)]), "special"),
        "fifo (tar)": (tar_with(tmp / "fifo.tar", [tar_member("c/fifo", tarfile.FIFOTYPE)]), "special"),
        "dot-dot (zip)": (_zip_with(tmp / "dotdot.zip", {"../evil.png": image}), ".."),
        "absolute (zip)": (_zip_with(tmp / "abs.zip", {"/evil.png": image}), "absolute"),
        "symlink (zip)": (_zip_with(tmp / "sym.zip", {"c/a.png": image}, symlink="c/link.png"), "link"),
        "undecodable image": (_zip_with(tmp / "broken.zip", {"c/a.png": b"\x89PNG broken"}), "decode"),
        "not an image": (_zip_with(tmp / "text.zip", {"c/a.txt": b"hello"}), "not an image"),
        "no class dirs": (_zip_with(tmp / "flat.zip", {"a.png": image}), "class"),
        "too many members": (many, "members"),
        "too large uncompressed": (bomb, "expands"),
        "truncated zip": (tmp / "truncated.zip", "zip"),
        "truncated tar.gz": (truncated_tgz, "tar"),
        "garbage npz": (tmp / "garbage.npz", "zip"),
        "pickled npz": (npz_obj, "pickle"),
        "labels count mismatch": (npz_bad_y, "'y'"),
        "float labels": (npz_float_y, "integer"),
        "npz without x": (npz_no_x, "'x'"),
        "NaN images": (npz_nan, "NaN"),
        "unknown format": (tmp / "notes.txt", "unsupported"),
    }


@pytest.fixture(scope="module")
def bad_datasets(tmp_path_factory):
    return _bad_datasets(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize(
    "case",
    [
        "absolute path (tar)",
        "dot-dot (tar)",
        "symlink (tar)",
        "hardlink (tar)",
        "device (tar)",
        "fifo (tar)",
        "dot-dot (zip)",
        "absolute (zip)",
        "symlink (zip)",
        "undecodable image",
        "not an image",
        "no class dirs",
        "too many members",
        "too large uncompressed",
        "truncated zip",
        "truncated tar.gz",
        "garbage npz",
        "pickled npz",
        "labels count mismatch",
        "float labels",
        "npz without x",
        "NaN images",
        "unknown format",
    ],
)
def test_bad_dataset_rejected_and_nothing_left(service, bad_datasets, case, monkeypatch):
    monkeypatch.setattr(service.settings, "max_archive_members", 50)
    monkeypatch.setattr(service.settings, "max_archive_bytes", 2 * 1024 * 1024)
    path, fragment = bad_datasets[case]
    before_store = _store_files(service)
    before_rows = service.client.get("/v1/datasets", headers=auth(service.key_a)).json()["data"]
    response = _upload(service, path)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_dataset"
    assert fragment.lower() in error["message"].lower(), error["message"]
    assert _store_files(service) == before_store
    assert service.client.get("/v1/datasets", headers=auth(service.key_a)).json()["data"] == before_rows
    assert not _scratch_files(service)
    assert not Path("/tmp/evil.png").exists()
    assert service.client.get("/healthz").status_code == 200


def test_oversized_and_empty_uploads(service, tmp_path):
    big = tmp_path / "big.npz"
    big.write_bytes(os.urandom(service.settings.max_upload_bytes + 2 * 1024 * 1024))
    response = _upload(service, big)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "upload_too_large"
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    response = _upload(service, empty)
    assert response.status_code == 422 and response.json()["error"]["code"] == "empty_upload"
    no_file = service.client.post("/v1/datasets", data={"x": "1"}, headers=auth(service.key_a))
    assert no_file.status_code == 422 and "file" in no_file.json()["error"]["message"]
    assert not _scratch_files(service)


def test_delete_dataset(service, tmp_path):
    body = _upload(service, write_npz(tmp_path / "del.npz", n=8, offset=500)).json()
    assert service.client.delete(f"/v1/datasets/{body['id']}", headers=auth(service.key_b)).status_code == 404
    sha = body["sha256"]
    assert any(sha in f for f in _store_files(service))
    assert service.client.delete(f"/v1/datasets/{body['id']}", headers=auth(service.key_a)).status_code == 204
    assert service.client.get(f"/v1/datasets/{body['id']}", headers=auth(service.key_a)).status_code == 404
    assert not any(sha in f for f in _store_files(service))


def test_dataset_in_use_cannot_be_deleted(service, tmp_path):
    body = _upload(service, write_npz(tmp_path / "use.npz", n=16, offset=900)).json()
    job = service.client.post(
        "/v1/jobs",
        json={
            "model": "fmnist-vit-tiny",
            "w_bits": 4,
            "a_bits": 4,
            "preset": "smoke",
            "calibration": body["id"],
            "evaluation": body["id"],
        },
        headers=auth(service.key_a),
    )
    assert job.status_code == 202, job.text
    response = service.client.delete(f"/v1/datasets/{body['id']}", headers=auth(service.key_a))
    assert response.status_code == 409 and response.json()["error"]["code"] == "dataset_in_use"
    # another tenant cannot name it in a job
    other = service.client.post(
        "/v1/jobs",
        json={"model": "fmnist-vit-tiny", "w_bits": 4, "a_bits": 4, "calibration": body["id"]},
        headers=auth(service.key_b),
    )
    assert other.status_code == 422 and "unknown dataset" in other.json()["error"]["message"]


def test_dataset_shape_must_fit_model(service, tmp_path):
    c, h = service.client, auth(service.key_a)
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, x=np.zeros((8, 28, 28, 3), np.uint8), y=np.zeros(8, np.int64))
    floats = tmp_path / "floats.npz"
    np.savez(floats, x=np.zeros((8, 1, 32, 32), np.float32), y=np.zeros(8, np.int64))
    many_classes = tmp_path / "classes.npz"
    np.savez(many_classes, x=np.zeros((8, 28, 28), np.uint8), y=np.arange(8) * 3)
    unlabeled = tmp_path / "unlabeled.npz"
    np.savez(unlabeled, x=np.zeros((8, 28, 28), np.uint8))
    ids = {
        name: _upload(service, p).json()["id"]
        for name, p in (("rgb", rgb), ("floats", floats), ("classes", many_classes), ("unlabeled", unlabeled))
    }
    base = {"w_bits": 4, "a_bits": 4, "preset": "smoke", "calibration": "fashion-mnist:train:32"}
    four_channel = {
        "timm_name": "vit_tiny_patch16_224",
        "timm_kwargs": {"img_size": 28, "patch_size": 4, "in_chans": 4, "num_classes": 10},
        "weights": "random",
    }
    cases = [
        ({"model": four_channel, "calibration": ids["rgb"]}, "channels"),
        ({"model": "fmnist-vit-tiny", "evaluation": ids["floats"]}, "[1, 28, 28]"),
        ({"model": "fmnist-vit-tiny", "evaluation": ids["classes"]}, "classes"),
        ({"model": "fmnist-vit-tiny", "evaluation": ids["unlabeled"]}, "no labels"),
    ]
    for change, fragment in cases:
        response = c.post("/v1/jobs", json=base | change, headers=h)
        assert response.status_code == 422, response.text
        assert fragment in response.json()["error"]["message"]
    ok = c.post(
        "/v1/jobs", json=base | {"model": "fmnist-vit-tiny", "calibration": ids["unlabeled"]}, headers=h
    )
    assert ok.status_code == 202, ok.text


# -- models -----------------------------------------------------------------------------------------


def _model_upload(service, path: Path, *, kwargs=None, preprocess=None, name=None, key=None, timm_name=None):
    data = {
        "timm_name": timm_name or FMNIST_TIMM["timm_name"],
        "timm_kwargs": kwargs
        if isinstance(kwargs, str)
        else __import__("json").dumps(FMNIST_TIMM["timm_kwargs"] if kwargs is None else kwargs),
    }
    if preprocess is not None:
        data["preprocess"] = (
            preprocess if isinstance(preprocess, str) else __import__("json").dumps(preprocess)
        )
    with open(path, "rb") as f:
        return service.client.post(
            "/v1/models",
            files={"file": (name or path.name, f)},
            data=data,
            headers=auth(key or service.key_a),
        )


def test_model_upload_and_listing(service):
    response = _model_upload(service, BUILTIN_WEIGHTS, preprocess=FMNIST_TIMM["preprocess"])
    assert response.status_code == 201, response.text
    model = response.json()
    assert model["id"].startswith("mdl_") and model["kind"] == "upload"
    assert model["timm_kwargs"] == FMNIST_TIMM["timm_kwargs"]
    listing = service.client.get("/v1/models", headers=auth(service.key_a)).json()
    ids = [m["id"] for m in listing["data"]]
    assert "fmnist-vit-tiny" in ids and model["id"] in ids
    assert "timm" in listing["note"]
    assert service.client.get(f"/v1/models/{model['id']}", headers=auth(service.key_a)).json() == model
    assert (
        service.client.get("/v1/models/fmnist-vit-tiny", headers=auth(service.key_a)).json()["kind"]
        == "builtin"
    )
    assert service.client.get(f"/v1/models/{model['id']}", headers=auth(service.key_b)).status_code == 404
    assert model["id"] not in [
        m["id"] for m in service.client.get("/v1/models", headers=auth(service.key_b)).json()["data"]
    ]
    job = service.client.post(
        "/v1/jobs",
        headers=auth(service.key_a),
        json={
            "model": model["id"],
            "w_bits": 4,
            "a_bits": 4,
            "preset": "smoke",
            "calibration": "fashion-mnist:train:32",
        },
    )
    assert job.status_code == 202, job.text
    other = service.client.post(
        "/v1/jobs",
        headers=auth(service.key_b),
        json={
            "model": model["id"],
            "w_bits": 4,
            "a_bits": 4,
            "preset": "smoke",
            "calibration": "fashion-mnist:train:32",
        },
    )
    assert other.status_code == 422 and "unknown model" in other.json()["error"]["message"]


def test_pth_state_dict_is_converted(service, tmp_path):
    import torch
    from safetensors.torch import load_file

    state = load_file(str(BUILTIN_WEIGHTS))
    pth = tmp_path / "weights.pth"
    torch.save({"state_dict": state}, pth)
    response = _model_upload(service, pth)
    assert response.status_code == 201, response.text


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_model_upload_rejections(service, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"weight": _Exploit(str(marker))}))
    import torch

    zipped_evil = tmp_path / "evil_zip.pth"
    with open(zipped_evil, "wb") as f:
        torch.save({"w": torch.zeros(1)}, f)  # a real torch zip, patched below with a code-running pickle
    buf = io.BytesIO(zipped_evil.read_bytes())
    with zipfile.ZipFile(buf) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = pickle.dumps(_Exploit(str(marker)), protocol=2)
    with zipfile.ZipFile(zipped_evil, "w") as zf:
        for n, d in members.items():
            zf.writestr(n, d)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": broken json')
    text_file = tmp_path / "weights.txt"
    text_file.write_bytes(b"not weights")
    before = _store_files(service)
    cases = [
        (dict(path=evil), "invalid_checkpoint", "weights_only"),
        (dict(path=zipped_evil), "invalid_checkpoint", "weights_only"),
        (dict(path=garbage), "invalid_checkpoint", "safetensors"),
        (dict(path=text_file), "invalid_checkpoint", "not safetensors"),
        (
            dict(path=BUILTIN_WEIGHTS, kwargs={**FMNIST_TIMM["timm_kwargs"], "num_classes": 5}),
            "invalid_model",
            "head",
        ),
        (dict(path=BUILTIN_WEIGHTS, kwargs={"img_size": 28}), "invalid_model", "does not fit"),
        (dict(path=BUILTIN_WEIGHTS, timm_name="resnet50"), "invalid_model", "resnet50"),
        (dict(path=BUILTIN_WEIGHTS, kwargs="{not json"), "invalid_request", "timm_kwargs"),
        (dict(path=BUILTIN_WEIGHTS, kwargs="[1]"), "invalid_request", "timm_kwargs"),
        (dict(path=BUILTIN_WEIGHTS, preprocess={"mean": "x"}), "invalid_model", "preprocess"),
    ]
    for kwargs, code, fragment in cases:
        response = _model_upload(service, **kwargs)
        assert response.status_code == 422, (kwargs, response.text)
        error = response.json()["error"]
        assert error["code"] == code and fragment in error["message"], (kwargs, error)
    assert not marker.exists(), "a pickle ran code"
    assert _store_files(service) == before
    assert not _scratch_files(service)
    missing = service.client.post(
        "/v1/models", files={"file": ("a.safetensors", b"x")}, headers=auth(service.key_a)
    )
    assert missing.status_code == 422 and "timm_name" in missing.json()["error"]["message"]
