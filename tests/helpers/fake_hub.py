"""A minimal Hugging Face Hub on 127.0.0.1 for the tests: what ``hf_hub_download`` needs, nothing more.

``HEAD``/``GET /{org}/{repo}/resolve/{revision}/{filename}`` answers with the headers the Hub sends
(``X-Repo-Commit``, ``ETag``, and for large files ``X-Linked-Etag``/``X-Linked-Size`` holding the sha256,
as for Git LFS), ``Content-Length`` and the bytes; an unknown repository is a 401 with
``X-Error-Code: RepoNotFound`` and an unknown file a 404 with ``X-Error-Code: EntryNotFound``, as the Hub
answers them, so ``huggingface_hub`` raises its own error types. Every request is counted per path, so a
test can show that a second job read the cache and not the server.

``fmnist_repo()`` is a timm-format repository holding the bundled ``fmnist-vit-tiny`` weights: the
``config.json`` timm writes (``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg`` with
Fashion-MNIST's mean and std) and ``model.safetensors``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

from tests.helpers.factories import BUILTIN_WEIGHTS, FMNIST_TIMM

LFS_ABOVE = 1 << 20
"""Files above this size are served as LFS files (sha256 ETag), smaller ones with a git-sha1-like ETag."""


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    commit: str = ""

    def __post_init__(self) -> None:
        if not self.commit:
            digest = hashlib.sha1()
            for name in sorted(self.files):
                digest.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
            self.commit = digest.hexdigest()


def fmnist_config() -> dict:
    """The ``config.json`` timm's ``push_to_hf_hub`` writes for the bundled model."""
    kwargs = FMNIST_TIMM["timm_kwargs"]
    return {
        "architecture": FMNIST_TIMM["timm_name"],
        "num_classes": kwargs["num_classes"],
        "num_features": 192,
        "global_pool": "token",
        "model_args": dict(kwargs),
        "pretrained_cfg": {
            "tag": "fmnist",
            "custom_load": False,
            "input_size": [1, 28, 28],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": FMNIST_TIMM["preprocess"]["mean"],
            "std": FMNIST_TIMM["preprocess"]["std"],
            "num_classes": kwargs["num_classes"],
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


def fmnist_repo(weights: Path = BUILTIN_WEIGHTS) -> FakeRepo:
    return FakeRepo({"config.json": json.dumps(fmnist_config(), indent=2).encode(),
                     "model.safetensors": weights.read_bytes()})


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo]
    requests: Counter = field(default_factory=Counter)
    chunk: int = 256 * 1024
    """GET bodies are written in chunks of this size, so the client's progress sees several updates."""
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def gets(self, filename: str) -> int:
        """How many GETs (downloads) asked for ``filename`` in any repository."""
        return sum(n for (method, path), n in self.requests.items()
                   if method == "GET" and path.endswith("/" + filename))

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: object) -> None:
                pass

            def _answer(self, body: bool) -> None:
                path = unquote(self.path.split("?", 1)[0])
                hub.requests[(self.command, path)] += 1
                parts = path.strip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404, "EntryNotFound", "not a resolve URL")
                repo = hub.repos.get(f"{parts[0]}/{parts[1]}")
                if repo is None:
                    return self._error(401, "RepoNotFound", "Repository not found")
                revision, filename = parts[3], "/".join(parts[4:])
                if revision not in ("main", repo.commit):
                    return self._error(404, "RevisionNotFound", "Invalid rev id", repo.commit)
                data = repo.files.get(filename)
                if data is None:
                    return self._error(404, "EntryNotFound", "Entry not found", repo.commit)
                self.send_response(200)
                self.send_header("X-Repo-Commit", repo.commit)
                if len(data) > LFS_ABOVE:
                    sha = hashlib.sha256(data).hexdigest()
                    self.send_header("ETag", f'"{sha}"')
                    self.send_header("X-Linked-Etag", f'"{sha}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                else:
                    self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if body:
                    for start in range(0, len(data), hub.chunk):
                        self.wfile.write(data[start:start + hub.chunk])

            def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
                raw = json.dumps({"error": message}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(raw)

            def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
                self._answer(body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, name="fake-hub", daemon=True).start()
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()
