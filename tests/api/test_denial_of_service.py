"""Issue 19, denial of service, against the real app (PostgreSQL, the in-process API): a body is not read
before its key is checked, JSON bodies have their own small limit, a 422 stays small whatever the body,
duplicate JSON keys are refused, and image archives have a pixel budget checked from each header.

The same attacks against a real server process (other tenants' latency, stalled readers, slow headers)
are in ``tests/e2e/test_slow_clients.py``.
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import DatasetError, load_dataset
from core.models import Preprocess
from core.pixel_budget import MIN_IMAGE_PIXELS, PixelBudget
from service.archives import ArchiveError, Limits, validate_upload
from tests.helpers.blobs import store_blobs
from tests.helpers.factories import auth, png_bytes
from tests.helpers.jobs import SMOKE

JOB_BYTES = json.dumps(SMOKE).encode()


def _error(response, status: int, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if code is not None:
        assert error["code"] == code, error
    return error["message"]


def _asgi_post(app, path: str, headers: dict[str, str], chunks: int, chunk: bytes) -> tuple[int, int, dict]:
    """POST straight to the ASGI app with a body of ``chunks`` × ``chunk`` that is handed over one chunk
    per ``receive``: returns (status, chunks the app asked for, error body)."""
    asked = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal asked
        if asked >= chunks:
            await asyncio.sleep(3600)  # the app waits for a disconnect only after the body
        asked += 1
        return {"type": "http.request", "body": chunk, "more_body": asked < chunks}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {},
    }
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 60))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], asked, json.loads(body)


# -- 1. the key before the body; JSON bodies have their own limit ------------------------------------


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/datasets", "/v1/models"])
@pytest.mark.parametrize("key", [None, "vitq_wrong"])
def test_an_unauthenticated_body_is_refused_before_a_byte_of_it_is_read(service, path, key):
    headers = {"content-type": "application/json" if path == "/v1/jobs" else "multipart/form-data; boundary=x"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    status, asked, body = _asgi_post(service.client.app, path, headers, chunks=40, chunk=b" " * (1 << 20))
    assert status == 401, body
    assert body["error"]["code"] == "unauthorized"
    assert asked == 0, f"the app read {asked} MiB of an unauthenticated body"


def test_an_authenticated_json_body_over_the_json_limit_gets_413_from_its_declared_length(service):
    limit = service.settings.max_json_body_bytes
    body = JOB_BYTES[:-1] + b', "webhook_url": "' + b"a" * limit + b'"}'
    response = service.client.post(
        "/v1/jobs", content=body, headers=auth(service.key_a) | {"Content-Type": "application/json"}
    )
    message = _error(response, 413, "body_too_large")
    assert f"JSON body of {len(body)} bytes exceeds the limit of {limit} bytes" in message


def test_a_chunked_json_body_stops_being_read_just_past_the_limit(service):
    limit = service.settings.max_json_body_bytes
    headers = auth(service.key_a) | {"content-type": "application/json", "transfer-encoding": "chunked"}
    status, asked, body = _asgi_post(service.client.app, "/v1/jobs", headers, chunks=400, chunk=b" " * 16384)
    assert status == 413, body
    assert body["error"]["code"] == "body_too_large"
    assert asked == limit // 16384 + 1


def test_a_job_body_of_normal_size_is_still_accepted(service):
    response = service.client.post("/v1/jobs", json=SMOKE, headers=auth(service.key_a))
    assert response.status_code == 202, response.text
    assert response.headers["RateLimit-Limit"], response.headers  # the early check's headers reach the answer


# -- 2. error amplification ----------------------------------------------------------------------------


def test_thousands_of_unknown_options_get_a_small_422_listing_ten(service):
    options = {f"u{i:04d}": 0 for i in range(5000)}  # ~ 50 kB, under the JSON limit
    body = json.dumps({**SMOKE, "options": options}).encode()
    assert len(body) < service.settings.max_json_body_bytes
    started = time.monotonic()
    response = service.client.post(
        "/v1/jobs", content=body, headers=auth(service.key_a) | {"Content-Type": "application/json"}
    )
    elapsed = time.monotonic() - started
    message = _error(response, 422, "invalid_request")
    assert len(response.content) < 4000, len(response.content)
    assert len(response.json()["error"]["details"]) == 10
    assert "options.u0000: Extra inputs are not permitted" in message
    assert message.endswith("and 4990 more error(s)"), message[-200:]
    assert elapsed < 10, elapsed  # was 422 of ten times the body; generous for a loaded machine


def test_long_unknown_keys_are_echoed_cut(service):
    options = {("k" * 5000) + str(i): 1 for i in range(10)}
    response = service.client.post("/v1/jobs", json={**SMOKE, "options": options}, headers=auth(service.key_a))
    _error(response, 422, "invalid_request")
    assert len(response.content) < 3000, len(response.content)
    assert "k" * 65 not in response.text


def test_a_large_unknown_timm_kwarg_is_echoed_cut(service):
    for kwargs in ({"no_such_kwarg": "x" * 30000}, {f"no_such_kwarg_{i}": "y" * 300 for i in range(150)}):
        model = {"timm_name": "vit_tiny_patch16_224", "timm_kwargs": kwargs}
        response = service.client.post("/v1/jobs", json={**SMOKE, "model": model}, headers=auth(service.key_a))
        assert 400 <= response.status_code < 500, response.text
        assert len(response.content) < 3000, (len(response.content), response.text[:300])
        assert "no_such_kwarg" in response.text


def test_every_error_message_is_cut_to_the_message_limit():
    from api.errors import MESSAGE_LIMIT, error_body

    message = error_body("x", "y" * 100_000)["error"]["message"]
    assert len(message) == MESSAGE_LIMIT + 1 and message.endswith("…")


# -- 3. duplicate JSON keys ----------------------------------------------------------------------------


def test_a_duplicate_key_in_a_job_body_is_refused_naming_it(service):
    body = JOB_BYTES[:-1] + b', "w_bits": 2}'
    response = service.client.post(
        "/v1/jobs", content=body, headers=auth(service.key_a) | {"Content-Type": "application/json"}
    )
    message = _error(response, 400, "invalid_json")
    assert "duplicate key 'w_bits'" in message, message


def test_a_duplicate_key_nested_in_options_is_refused_naming_it(service):
    body = JOB_BYTES[:-1] + b', "options": {"lr": 0.001, "iters": 2, "lr": 0.5}}'
    response = service.client.post(
        "/v1/jobs", content=body, headers=auth(service.key_a) | {"Content-Type": "application/json"}
    )
    assert "duplicate key 'lr'" in _error(response, 400, "invalid_json")


def test_a_duplicate_key_in_a_json_form_field_is_refused_naming_it(service):
    response = service.client.post(
        "/v1/models",
        files={"file": ("m.safetensors", b"x" * 16)},
        data={"timm_name": "vit_tiny_patch16_224", "timm_kwargs": '{"img_size": 28, "img_size": 32}'},
        headers=auth(service.key_a),
    )
    assert "duplicate key 'img_size'" in _error(response, 422, "invalid_request")


def test_deeply_nested_json_is_a_400_not_a_500(service):
    body = b'{"options": ' + b"[" * 30000 + b"]" * 30000 + b"}"
    response = service.client.post(
        "/v1/jobs", content=body, headers=auth(service.key_a) | {"Content-Type": "application/json"}
    )
    assert "nested too deeply" in _error(response, 400, "invalid_json")


# -- 5. pixel bombs ------------------------------------------------------------------------------------


def _png_of_zeros(width: int, height: int) -> bytes:
    """A grey PNG of ``width`` × ``height`` zeros, compressed row by row (a 144 Mpx one is ~140 kB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    return _png_of_zeros(12000, 12000)


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_a_png_that_decodes_to_144_megapixels_is_refused_from_its_header(service, bomb_png):
    small = png_bytes(np.zeros((28, 28), np.uint8))
    archive = _zip({"data/a/0.png": small, "data/a/1.png": small, "data/b/bomb.png": bomb_png})
    assert len(archive) < 1_000_000
    before = store_blobs(service.settings.resolved_storage_dir)
    started = time.monotonic()
    response = service.client.post("/v1/datasets", files={"file": ("bomb.zip", archive)}, headers=auth(service.key_a))
    elapsed = time.monotonic() - started
    message = _error(response, 422, "invalid_dataset")
    assert "b/bomb.png is 12000 × 12000 = 144,000,000 pixels" in message, message
    assert "16,777,216 pixels per image" in message
    assert elapsed < 10, elapsed  # decoding it took seconds of CPU and 144 MB; the header takes microseconds
    assert store_blobs(service.settings.resolved_storage_dir) == before


def test_an_archive_over_the_per_upload_pixel_budget_is_refused(tmp_path):
    image = png_bytes(np.zeros((100, 100), np.uint8))  # 10,000 pixels each
    raw = tmp_path / "upload"
    raw.write_bytes(_zip({f"data/c{i % 2}/{i}.png": image for i in range(10)}))
    limits = Limits(max_members=100, max_bytes=10**8, pixels=PixelBudget(total=45_000))
    with pytest.raises(ArchiveError, match=r"hold 50,000 pixels; the limit is 45,000 pixels per dataset"):
        validate_upload(raw, "many.zip", tmp_path, limits)


def test_the_archive_limits_take_the_pixel_settings(service):
    from dataclasses import replace

    settings = service.settings.model_copy(update={"max_image_pixels": 100})
    limits = Limits.from_settings(settings)
    assert limits.pixels.per_image == 100 and limits.pixels.total == PixelBudget().total
    assert replace(limits, pixels=PixelBudget()).pixels.per_image == 4096 * 4096


def test_with_the_model_known_the_per_image_bound_follows_its_input_size(tmp_path: Path):
    assert PixelBudget().for_input_size((1, 28, 28)).per_image == MIN_IMAGE_PIXELS
    assert PixelBudget().for_input_size((3, 224, 224)).per_image == 256 * 224 * 224
    assert PixelBudget().for_input_size((3, 512, 512)).per_image == 4096 * 4096
    root = tmp_path / "folder"
    (root / "a").mkdir(parents=True)
    (root / "a" / "small.png").write_bytes(png_bytes(np.zeros((28, 28), np.uint8)))
    Image.new("L", (2100, 2100)).save(root / "a" / "large.png")  # 4.4 Mpx: too large for a 28 × 28 model
    pre = Preprocess(mean=(0.5,), std=(0.5,), input_size=(1, 28, 28))
    data = load_dataset(str(root), pre, name="folder")
    with pytest.raises(DatasetError, match=r"large.png is 2100 × 2100 = 4,410,000 pixels; the limit is 4,194,304"):
        data.images()
    big = Preprocess(mean=(0.5,), std=(0.5,), input_size=(1, 224, 224))
    assert load_dataset(str(root), big, name="folder").images().shape == (2, 1, 224, 224)
