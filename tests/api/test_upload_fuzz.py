"""Property-based fuzzing of the upload endpoints (Hypothesis) against the real app and PostgreSQL.

Generated ``.npz`` files (shapes, dtypes including uint64/float16/object/structured, NaN/inf, label
ranges, extra and missing members, truncation), ImageFolder archives (names, depths, member types and
links, sizes, encodings; zip, tar, tar.gz) and safetensors files (header length, JSON, dtypes, shapes,
offsets, duplicate names, metadata, NaN weights) go to ``POST /v1/datasets`` and ``POST /v1/models``.
Every case must end in a 2xx or a 4xx in the error format whose message shows no server path, and the
store must hold exactly the blobs the rows of this module's tenants name (no orphans) after each case.

Profiles: ``VITQ_FUZZ_PROFILE=default`` (``make test``: derandomized, bounded, about a minute) or ``long``
(random, 10x the cases: ``make fuzz``).
"""

from __future__ import annotations

import collections
import io
import json
import os
import socket
import struct
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors
from sqlalchemy import select

from core.models import resolve_model_spec
from service.db import session_scope
from service.keys import authenticate
from service.tables import Artifact, Dataset, Job, Model
from tests.helpers.blobs import store_blobs
from tests.helpers.factories import auth, png_bytes

PROFILE = os.environ.get("VITQ_FUZZ_PROFILE", "default")
EXAMPLES = {"npz": 110, "archive": 90, "safetensors": 110}
SCALE = {"default": 1, "long": 10}[PROFILE]
settings.register_profile(
    "vitq-fuzz-default", deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=list(HealthCheck),
)
settings.register_profile(
    "vitq-fuzz-long", deadline=None, derandomize=False, database=None, print_blob=True,
    suppress_health_check=list(HealthCheck),
)
BASE = settings.get_profile(f"vitq-fuzz-{PROFILE}")
OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
pytestmark = [
    pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning"),  # generated zips repeat names
    pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),  # labels cast on purpose
]

TINY = {"timm_name": "vit_tiny_patch16_224",
        "timm_kwargs": {"img_size": 8, "patch_size": 4, "in_chans": 1, "num_classes": 2, "depth": 1,
                        "embed_dim": 16, "num_heads": 2}}
"""The architecture the safetensors cases are uploaded for: a few thousand parameters, so a valid file is
a few kB and a case costs milliseconds."""


# -- the invariant ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tenants(service) -> list[str]:
    with session_scope(service.settings.resolved_database_url) as session:
        return [authenticate(session, key=k).id for k in (service.key_a, service.key_b)]


def _referenced(service, tenant_ids: list[str]) -> set[str]:
    with session_scope(service.settings.resolved_database_url) as session:
        shas = set(session.scalars(select(Dataset.sha256).where(Dataset.tenant_id.in_(tenant_ids))))
        shas |= set(session.scalars(select(Model.sha256).where(Model.tenant_id.in_(tenant_ids))))
        shas |= set(session.scalars(
            select(Artifact.sha256).join(Job, Job.id == Artifact.job_id).where(Job.tenant_id.in_(tenant_ids))
        ))
    return shas


def _check(service, tenant_ids: list[str], kind: str, response) -> None:
    status = response.status_code
    OUTCOMES[kind][f"{status} {response.json()['error']['code']}" if status >= 400 else str(status)] += 1
    assert status < 500, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    if status >= 400:
        error = response.json()["error"]
        assert error["code"] and error["message"], error
        for leak in (str(service.settings.data_dir.resolve()), "upload-", socket.gethostname(), "/tmp/"):
            assert leak not in error["message"], (leak, error["message"])
    else:
        assert status == 201, response.text
    blobs = store_blobs(service.settings.resolved_storage_dir)
    assert blobs == _referenced(service, tenant_ids), "the store and the rows disagree (an orphan or a lost blob)"


# -- .npz -------------------------------------------------------------------------------------------

X_DTYPES = ["u1", "i1", "u2", "i8", "u8", "f2", "f4", "f8", "?", "c8", "U3", "object", "structured"]
LABEL_VALUES = [0, 1, 9, 255, 2**31 - 1, 2**31, 99_999, 100_000, 2**63 - 1, 2**64 - 1, -1, -(2**63)]
Y_DTYPES = ["i8", "u8", "i4", "u1", "i1", "u2", "f4", "?", "object"]
FILENAMES = ["data.npz", "d.npz", "..", "../../x.npz", "ünï cödé.npz", "", "x" * 300 + ".npz", "noext", "a.zip",
             ".npz", "con.npz"]


def _fill(dtype: str, shape: tuple[int, ...], special: str) -> np.ndarray:
    if dtype == "object":
        return np.array([{"a": 1}] * (shape[0] if shape else 1), dtype=object)
    if dtype == "structured":
        return np.zeros(shape, dtype=[("a", "u1"), ("b", "<f4")])
    array = np.zeros(shape, dtype=dtype)
    if array.size and special != "zeros":
        flat = array.reshape(-1)
        if dtype.startswith(("f", "c")):
            flat[:] = {"nan": np.nan, "inf": np.inf, "ones": 1.0, "big": 1e30}.get(special, 0.5)
        elif dtype.startswith(("u", "i")):
            flat[:] = np.iinfo(dtype).max
    return array


@st.composite
def npz_files(draw) -> tuple[str, bytes]:
    arrays: dict[str, np.ndarray] = {}
    plausible = draw(st.booleans())
    if plausible:  # plausible images (N×H×W uint8 or N×C×H×W float), so the labels get checked
        n, h, w = draw(st.integers(1, 6)), draw(st.integers(1, 8)), draw(st.integers(1, 8))
        dtype = draw(st.sampled_from(["u1", "u1", "f4", "f2"]))
        shape = (n, h, w) if dtype == "u1" else (n, draw(st.sampled_from([1, 3])), h, w)
    else:
        ndim = draw(st.integers(0, 5))
        shape = tuple(draw(st.lists(st.integers(0, 7), min_size=ndim, max_size=ndim)))
        dtype = draw(st.sampled_from(X_DTYPES))
    if draw(st.integers(0, 9)):  # x present most of the time
        name = "x" if draw(st.integers(0, 7)) else draw(st.sampled_from(["X", "images", "x ", "data"]))
        arrays[name] = _fill(dtype, shape, draw(st.sampled_from(["zeros", "ones", "nan", "inf", "big"])))
    if draw(st.integers(0, 3)) if plausible else draw(st.booleans()):
        n = shape[0] if shape else 1
        length = max(0, n + (0 if plausible and draw(st.booleans()) else draw(st.sampled_from([0, 1, -1]))))
        dtype = draw(st.sampled_from(["i8", "u8", "i4"] if plausible and draw(st.booleans()) else Y_DTYPES))
        if dtype == "object":
            y = np.array([None] * length, dtype=object)
        else:
            small = st.integers(0, 9)
            values = draw(st.lists(st.one_of(small, st.sampled_from(LABEL_VALUES)), min_size=length, max_size=length))
            info = np.iinfo(dtype) if dtype[0] in "iu" else None
            clipped = [min(max(v, info.min), info.max) for v in values] if info else values
            y = np.array(clipped, dtype=np.float64 if info is None else object).astype(dtype)
            if draw(st.integers(0, 9)) == 0:
                y = y.reshape(1, -1)
        arrays["y"] = y
    if draw(st.integers(0, 3)) == 0:
        for extra in draw(st.lists(st.sampled_from(["z", "meta", "x2", "../evil", "labels"]), max_size=2)):
            arrays[extra] = np.arange(3)
    buf = io.BytesIO()
    (np.savez_compressed if draw(st.booleans()) else np.savez)(buf, **arrays)
    data = buf.getvalue()
    cut = draw(st.sampled_from(["none"] * 10 + ["truncate", "flip"]))
    if cut == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif cut == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
    name = "data.npz" if plausible and draw(st.integers(0, 3)) else draw(st.sampled_from(FILENAMES))
    return name, data


@given(case=npz_files())
@settings(BASE, max_examples=EXAMPLES["npz"] * SCALE)
def test_npz_uploads(service, tenants, case):
    filename, data = case
    response = service.client.post("/v1/datasets", files={"file": (filename, data)}, headers=auth(service.key_a))
    _check(service, tenants, "npz", response)


# -- ImageFolder archives ---------------------------------------------------------------------------

PARTS = ["c0", "c1", "ü", "a b", "..", ".", "", "x" * 120, "back\\slash", "/abs", "__MACOSX", ".git", "日本"]
LEAVES = ["a.png", "b.PNG", "c.jpg", "d.txt", ".hidden.png", "ünï.png", "y" * 120 + ".png", "noext", "e.png/"]
PNG = png_bytes(np.full((6, 6), 128, np.uint8))
RGBA = png_bytes(np.zeros((5, 7, 4), np.uint8))
PAYLOADS = {"png": PNG, "rgba": RGBA, "garbage": b"\x89PNG\r\n\x1a\nnot an image", "empty": b"",
            "truncated": PNG[: len(PNG) // 2], "text": b"hello"}


@st.composite
def members(draw) -> tuple[str, str, str, str]:
    parts = draw(st.lists(st.sampled_from(PARTS), min_size=0, max_size=3))
    name = "/".join([*parts, draw(st.sampled_from(LEAVES))])
    kind = draw(st.sampled_from(["file"] * 6 + ["dir", "symlink", "hardlink", "fifo", "chardev"]))
    target = draw(st.sampled_from(["/etc/passwd", "../../x", "c0/a.png", "a.png", ""]))
    return name, kind, draw(st.sampled_from(list(PAYLOADS))), target


def _tar(entries, compress: bool, fmt: int, encoding: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if compress else "w", format=fmt, encoding=encoding,
                      errors="replace") as tf:
        for name, kind, payload, target in entries:
            info = tarfile.TarInfo(name)
            info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                         "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE, "chardev": tarfile.CHRTYPE}[kind]
            info.linkname = target if kind in ("symlink", "hardlink") else ""
            data = PAYLOADS[payload] if kind == "file" else b""
            info.size = len(data)
            try:
                tf.addfile(info, io.BytesIO(data))
            except ValueError:  # a name this format cannot hold (USTAR's 100 bytes): left out
                continue
    return buf.getvalue()


def _zip(entries) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, kind, payload, target in entries:
            if kind == "dir":
                zf.writestr(zipfile.ZipInfo(name.rstrip("/") + "/"), b"")
            elif kind in ("symlink", "hardlink"):
                info = zipfile.ZipInfo(name)
                info.external_attr = 0o120777 << 16
                zf.writestr(info, target)
            else:
                zf.writestr(name, PAYLOADS[payload])
    return buf.getvalue()


@st.composite
def archives(draw) -> tuple[str, bytes]:
    entries = draw(st.lists(members(), min_size=0, max_size=7))
    if draw(st.booleans()):  # a valid core more often than chance gives one
        entries += [(f"c{i % 2}/{i}.png", "file", "png", "") for i in range(draw(st.integers(1, 4)))]
    kind = draw(st.sampled_from(["zip", "tar", "tar.gz"]))
    if kind == "zip":
        data = _zip(entries)
    else:
        fmt = draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
        data = _tar(entries, kind == "tar.gz", fmt, draw(st.sampled_from(["utf-8", "latin-1", "ascii"])))
    if draw(st.integers(0, 7)) == 0 and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    name = draw(st.sampled_from([f"data.{kind}", f"../{kind}", f"d.{kind}", "noext", f"ü.{kind}"]))
    return name, data


@given(case=archives())
@settings(BASE, max_examples=EXAMPLES["archive"] * SCALE)
def test_imagefolder_uploads(service, tenants, case):
    filename, data = case
    response = service.client.post("/v1/datasets", files={"file": (filename, data)}, headers=auth(service.key_a))
    _check(service, tenants, "archive", response)


# -- safetensors ------------------------------------------------------------------------------------


def _valid_state() -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(TINY["timm_name"], **TINY["timm_kwargs"])
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


STATE = _valid_state()
assert resolve_model_spec(TINY).timm_name == TINY["timm_name"]


def _split(blob: bytes) -> tuple[dict, bytes]:
    length = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


VALID_HEADER, VALID_DATA = _split(save_safetensors(STATE))
HALF_HEADER, HALF_DATA = _split(save_safetensors({k: v.half() for k, v in STATE.items()}))
ST_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "F4", "E8M0", "f32", 5, None]
ODD_INTS = [0, 1, -1, 3, 2**31, 2**53, 2**64, 10**30]


@st.composite
def safetensors_files(draw) -> tuple[str, bytes]:
    base = draw(st.sampled_from(["f32", "f16"]))
    header = json.loads(json.dumps(VALID_HEADER if base == "f32" else HALF_HEADER))
    data = bytearray(VALID_DATA if base == "f32" else HALF_DATA)
    names = sorted(k for k in header if k != "__metadata__")
    raw_text = None
    for op in draw(st.lists(st.sampled_from(
        ["dtype", "shape", "offsets", "drop", "extra", "metadata", "nan", "truncate", "duplicate", "json",
         "length", "swap", "pad"]), min_size=0, max_size=3)):
        key = draw(st.sampled_from(names))
        offsets = header.get(key, {}).get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            continue  # dropped, or its offsets already mangled by an earlier step
        if op == "dtype":
            header[key]["dtype"] = draw(st.sampled_from(ST_DTYPES))
        elif op == "shape":
            header[key]["shape"] = draw(st.one_of(
                st.lists(st.sampled_from(ODD_INTS), max_size=4), st.just("3x3"), st.just([1.5]),
                st.just(list(reversed(header[key]["shape"])))))
        elif op == "offsets":
            start, end = header[key]["data_offsets"]
            header[key]["data_offsets"] = draw(st.sampled_from(
                [[start, end + 4], [start + 4, end], [end, start], [-4, end], [start, 2**64], [start], "0-4",
                 [start, end, 0], [0, end - start]]))
        elif op == "drop":
            del header[key]
        elif op == "extra":
            header[draw(st.sampled_from(["extra", "blocks.9.x", "", "ü" * 40]))] = {
                "dtype": "F32", "shape": [1], "data_offsets": [len(data), len(data) + 4]}
            data += b"\0\0\0\0"
        elif op == "metadata":
            header["__metadata__"] = draw(st.sampled_from([{"format": "pt"}, {"a": 1}, [], "x", {"b": None}]))
        elif op == "nan":
            start, end = header[key]["data_offsets"]
            if end > start and header[key]["dtype"] in ("F32", "F16"):
                width = 4 if header[key]["dtype"] == "F32" else 2
                data[start : start + width] = b"\xff" * width
        elif op == "truncate":
            del data[draw(st.integers(0, max(0, len(data) - 1))) :]
        elif op == "swap":
            other = draw(st.sampled_from(names))
            if other in header:
                header[key]["data_offsets"], header[other]["data_offsets"] = (
                    header[other]["data_offsets"], header[key]["data_offsets"])
        elif op == "duplicate":
            text = json.dumps(header)
            entry = json.dumps({key: header[key]})[1:-1]
            raw_text = text[:-1] + ", " + entry + "}"
        elif op == "json":
            raw_text = draw(st.sampled_from(['{"a": broken', "[]", "null", '{"x": NaN}', "{" * 5000, '"s"',
                                             json.dumps(header)[:-1], "{}", "\ud800"]))
        elif op == "pad":
            raw_text = json.dumps(header) + " " * draw(st.integers(1, 9))
    text = raw_text if raw_text is not None else json.dumps(header)
    encoded = text.encode("utf-8", "surrogatepass")
    length = len(encoded)
    if draw(st.integers(0, 9)) == 0:
        length = draw(st.sampled_from([0, 1, length - 1, length + 1, len(data) + length, 2**27 + 1, 2**63]))
    blob = struct.pack("<Q", length % 2**64) + encoded + bytes(data)
    return draw(st.sampled_from(["w.safetensors", "w.pth", "w.bin", "..", "noext"])), blob


@given(case=safetensors_files())
@settings(BASE, max_examples=EXAMPLES["safetensors"] * SCALE)
def test_safetensors_uploads(service, tenants, case):
    filename, data = case
    response = service.client.post(
        "/v1/models",
        files={"file": (filename, data)},
        data={"timm_name": TINY["timm_name"], "timm_kwargs": json.dumps(TINY["timm_kwargs"])},
        headers=auth(service.key_a),
    )
    _check(service, tenants, "safetensors", response)


def test_zz_report_outcomes():
    """Runs last in the module: the case counts per outcome (``-s`` shows them)."""
    for kind, counter in OUTCOMES.items():
        print(f"fuzz {kind}: {sum(counter.values())} cases: {dict(counter.most_common())}")
    assert sum(sum(c.values()) for c in OUTCOMES.values()) > 0
