"""Issue 15's reproductions against create_app on the embedded default (SQLite, as `vitq serve`), through the
test client (no network). Prints one Markdown table row per case (docs/hostile-input.md).

Usage: PYTHONPATH=<checkout> python scripts/repro_hostile_input.py  (run it in that checkout to compare commits)
"""

import io
import json
import logging
import os
import pickle
import resource
import secrets
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

import migrations
from api.app import create_app
from service.db import session_scope
from service.keys import create_key
from service.settings import Settings
from service.storage import get_store
from service.tables import Artifact

warnings.filterwarnings("ignore")
d = Path(tempfile.mkdtemp(prefix="repro-"))
s = Settings(data_dir=d, queue=f"repro-{secrets.token_hex(3)}")
migrations.upgrade(s.resolved_database_url)
with session_scope(s.resolved_database_url) as ses:
    key = create_key(ses, tenant_name="repro").key
H = {"Authorization": f"Bearer {key}"}
app = create_app(s)


def boom():
    raise RuntimeError("a bug")


app.add_api_route("/v1/boom", boom)
c = TestClient(app, raise_server_exceptions=False)
JOB = {"model": "fmnist-vit-tiny", "w_bits": 4, "a_bits": 4, "preset": "smoke", "calibration": "fashion-mnist:train:32"}


def blobs():
    return len([p for p in s.resolved_storage_dir.glob("??/*")])


def show(label, r, t0, extra=""):
    try:
        body = r.json()
        err = body.get("error") if isinstance(body, dict) else None
        what = f"{err['code']}: {err['message'][:140]}" if err else (json.dumps(body)[:80])
    except Exception:
        what = f"[{r.headers.get('content-type')}] {r.text[:80]!r}"
    print(f"| {label} | {r.status_code} {what} | {time.monotonic() - t0:.2f} s {extra}|", flush=True)


def npz(**a):
    b = io.BytesIO()
    np.savez(b, **a)
    return b.getvalue()


def up(name, data, **kw):
    return c.post("/v1/datasets", files={"file": (name, data)}, headers=H, **kw)


def cpu():
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime + resource.getrusage(resource.RUSAGE_SELF).ru_stime


for label, y in (
    ("1 y int64 2**63-1", np.array([0] * 7 + [2**63 - 1], np.int64)),
    ("1 y uint64 2**64-1", np.array([0] * 7 + [2**64 - 1], np.uint64)),
):
    b0, t0 = blobs(), time.monotonic()
    r = up("labels.npz", npz(x=np.zeros((8, 28, 28), np.uint8), y=y))
    show(label, r, t0, f"blobs +{blobs() - b0} ")
for depth in (3000, 2000):
    t0, c0, m0 = time.monotonic(), cpu(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = c.post(
        "/v1/jobs",
        json={**JOB, "model": {"timm_name": "vit_tiny_patch16_224", "timm_kwargs": {"depth": depth}}},
        headers=H,
    )
    show(
        f"2 depth {depth}",
        r,
        t0,
        f"CPU {cpu() - c0:.1f} s, peak RSS +{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - m0) // 1024} MiB ",
    )
t0 = time.monotonic()
r = c.post(
    "/v1/jobs",
    json={**JOB, "model": {"timm_name": "deit_tiny_patch16_224", "timm_kwargs": {"pretrained": True}}},
    headers=H,
)
show("3 pretrained true", r, t0)
t0 = time.monotonic()
show("4 x (4,0,28)", up("my-images.npz", npz(x=np.zeros((4, 0, 28), np.uint8))), t0)
for cur in ("garbage", "zzzz"):
    t0 = time.monotonic()
    r = c.get("/v1/jobs", params={"cursor": cur}, headers=H)
    show(f"6 cursor={cur}", r, t0, f"({len(r.json().get('data', [])) if r.status_code == 200 else '-'} jobs) ")
job = c.post("/v1/jobs", json=JOB, headers=H).json()
f = d / "report.json"
f.write_bytes(b'{"n": 1}' * 50)
sha, size = get_store(s.resolved_storage_dir).put_file(f)
with session_scope(s.resolved_database_url) as ses:
    ses.add(
        Artifact(job_id=job["id"], name="report.json", sha256=sha, size_bytes=size, content_type="application/json")
    )
url = f"/v1/jobs/{job['id']}/artifacts/report.json"
t0 = time.monotonic()
show("7 HEAD download", c.head(url, headers=H), t0)
for v in ("*", f'W/"{sha}"'):
    t0 = time.monotonic()
    show(f"7 If-None-Match: {v[:12]}", c.get(url, headers=H | {"If-None-Match": v}), t0)
t0 = time.monotonic()
show("7 Range: bytes=abc", c.get(url, headers=H | {"Range": "bytes=abc"}), t0)
t0 = time.monotonic()
show("7 Range: bytes=999999-", c.get(url, headers=H | {"Range": "bytes=999999-"}), t0)
t0 = time.monotonic()
show(
    "7 JSON as text/plain", c.post("/v1/jobs", content=json.dumps(JOB), headers=H | {"Content-Type": "text/plain"}), t0
)
t0 = time.monotonic()
show("7 body {not json", c.post("/v1/jobs", content=b"{not json", headers=H | {"Content-Type": "application/json"}), t0)
t0 = time.monotonic()
show(
    "7 lr NaN",
    c.post(
        "/v1/jobs",
        content=json.dumps(JOB)[:-1] + ', "options": {"lr": NaN}}',
        headers=H | {"Content-Type": "application/json"},
    ),
    t0,
)
good = npz(x=np.zeros((4, 28, 28), np.uint8), y=np.zeros(4, np.int64))
t0 = time.monotonic()
show(
    "7 two file fields",
    c.post("/v1/datasets", files=[("file", ("a.npz", good)), ("file", ("b.npz", b"junk"))], headers=H),
    t0,
)
t0 = time.monotonic()
r = up("..", npz(x=np.ones((3, 28, 28), np.uint8), y=np.zeros(3, np.int64)))
show("7 filename ..", r, t0, f"(stored as {r.json().get('filename')!r}) ")
t0 = time.monotonic()
show('7 "sos": "yes"', c.post("/v1/jobs", json={**JOB, "options": {"sos": "yes"}}, headers=H), t0)
t0 = time.monotonic()
r = c.get("/v1/jobs/job_" + "a" * 5000, headers=H)
show("7 5000-char id", r, t0, f"(message {len(r.json()['error']['message'])} chars) ")
records = []


class Count(logging.Handler):
    def emit(self, record):
        if record.exc_info:
            records.append(record)


logging.getLogger().addHandler(Count())
strict = TestClient(app, raise_server_exceptions=True)
t0 = time.monotonic()
try:
    r = strict.get("/v1/boom")
    show(
        "8 unhandled error",
        r,
        t0,
        f"({len(records)} traceback(s) logged by the app; exception reached the server: no) ",
    )
except RuntimeError:
    print(
        "| 8 unhandled error | 500 internal_error, and the exception re-raised to the server (logged again) "
        f"| {len(records)} traceback(s) logged by the app |"
    )


class Evil:
    def __reduce__(self):
        return (os.system, ("true",))


t0 = time.monotonic()
show(
    "8 .pth pickle",
    c.post(
        "/v1/models",
        files={"file": ("evil.pth", pickle.dumps({"w": Evil()}, protocol=2))},
        data={
            "timm_name": "vit_tiny_patch16_224",
            "timm_kwargs": '{"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10}',
        },
        headers=H,
    ),
    t0,
)
