"""Python client for the vitq REST API (httpx).

from vitq.client import Client
client = Client("http://127.0.0.1:8000", api_key="vitq_…")
job = client.submit_job(model="fmnist-vit-tiny", w_bits=4, a_bits=4, preset="quick",
                        calibration="fashion-mnist:train:1024", evaluation="fashion-mnist:test")
job = client.wait(job["id"], on_progress=print)
client.download_artifacts(job["id"], "out/")
# or the smallest model within one point of top-1 (per-unit mixed precision allowed):
job = client.submit_target_job(max_top1_drop=0.01, model="fmnist-vit-tiny", preset="quick",
                               calibration="fashion-mnist:train:1024", evaluation="fashion-mnist:test")
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import httpx

FINISHED = {"succeeded", "failed", "cancelled"}
DEFAULT_URL = "http://127.0.0.1:8000"


class VitqApiError(Exception):
    """The API's ``{"error": {code, message}}`` answer, with its HTTP status."""

    def __init__(self, status: int, code: str, message: str, *, key_sent: bool | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.key_sent = key_sent
        """Whether the request carried an API key (so a 401 means a refused key, not a missing one)."""


class JobWaitTimeout(TimeoutError):
    """``wait(timeout=…)`` ran out; ``job`` is the last state seen (the job itself keeps running)."""

    def __init__(self, job: dict[str, Any], timeout: float) -> None:
        super().__init__(f"job {job['id']} still {job['status']} after {timeout} s")
        self.job = job
        self.timeout = timeout


def file_sha256(path: str | Path) -> str:
    """The sha256 the API records for an upload, computed locally to skip sending bytes it already has."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _ReadCounter:
    """A file whose reads report how many bytes went out: httpx streams multipart files by ``read``,
    so this is where an upload's progress is."""

    def __init__(self, file: IO[bytes], on_bytes: Callable[[int], None]) -> None:
        self._file = file
        self._on_bytes = on_bytes

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        if chunk:
            self._on_bytes(len(chunk))
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def fileno(self) -> int:
        return self._file.fileno()


def default_api_key() -> str | None:
    """``VITQ_API_KEY``, else the key ``vitq serve`` wrote to ``$VITQ_DATA_DIR/local-api-key``."""
    key = os.environ.get("VITQ_API_KEY")
    if key:
        return key
    path = Path(os.environ.get("VITQ_DATA_DIR", ".vitq")) / "local-api-key"
    return path.read_text().strip() if path.is_file() else None


class Client:
    def __init__(
        self, base_url: str | None = None, api_key: str | None = None, timeout: float = 60.0
    ) -> None:
        self.base_url = (base_url or os.environ.get("VITQ_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key or default_api_key()
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                code, message = error["code"], error["message"]
            except (ValueError, KeyError, TypeError):
                code, message = "http_error", response.text[:500]
            raise VitqApiError(response.status_code, code, message, key_sent=self.api_key is not None)
        return response

    # jobs
    def submit_job(self, *, idempotency_key: str | None = None, **body: Any) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/v1/jobs", json=body, headers=headers).json()

    def submit_target_job(
        self, *, max_top1_drop: float, w_bits: list[int] | None = None, a_bits: list[int] | None = None,
        max_trials: int | None = None, idempotency_key: str | None = None, **body: Any,
    ) -> dict[str, Any]:
        """A job with ``"target": {"max_top1_drop": …}`` instead of fixed bits (``w_bits``/``a_bits`` here
        bound the search); ``body`` needs ``evaluation``. The result names the chosen configuration."""
        target = {"max_top1_drop": max_top1_drop, "w_bits": w_bits, "a_bits": a_bits, "max_trials": max_trials}
        return self.submit_job(idempotency_key=idempotency_key,
                               target={k: v for k, v in target.items() if v is not None}, **body)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def list_jobs(self, *, status: str | None = None, limit: int = 50, cursor: str | None = None) -> dict:
        params = {
            k: v for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v is not None
        }
        return self._request("GET", "/v1/jobs", params=params).json()

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def job_events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's event log, oldest first: submitted, started, requeued, cancel requested, finished."""
        return self._request("GET", f"/v1/jobs/{job_id}/events").json()["data"]

    def delete_job(self, job_id: str) -> None:
        """Cancel the job if it is unfinished and remove it and its artifacts."""
        self._request("DELETE", f"/v1/jobs/{job_id}")

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll: float = 1.0,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job["status"] in FINISHED:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise JobWaitTimeout(job, timeout)
            time.sleep(poll)

    # artifacts
    def list_artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self._request("GET", f"/v1/jobs/{job_id}/artifacts").json()["data"]

    def download_artifact(self, job_id: str, name: str, dest: str | Path) -> Path:
        """Stream an artifact to ``dest`` and check its sha256 against the ETag. ``dest`` is a directory
        (the file keeps its name there) when it is one or ends with a path separator, else the file."""
        is_dir = str(dest).endswith(("/", os.sep)) or Path(dest).is_dir()
        dest = Path(dest)
        target = dest / name if is_dir else dest
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with self._http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}") as response:
            if response.status_code >= 400:
                response.read()
                self._raise_for(response)
            etag = response.headers.get("etag", "").strip('"')
            tmp = target.with_name(target.name + ".part")
            with open(tmp, "wb") as out:
                for chunk in response.iter_bytes(1024 * 1024):
                    digest.update(chunk)
                    out.write(chunk)
        if etag and digest.hexdigest() != etag:
            tmp.unlink(missing_ok=True)
            raise VitqApiError(
                502, "checksum_mismatch", f"{name}: sha256 {digest.hexdigest()} != ETag {etag}"
            )
        tmp.replace(target)
        return target

    def download_artifacts(self, job_id: str, dest: str | Path) -> list[Path]:
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        return [self.download_artifact(job_id, a["name"], dest) for a in self.list_artifacts(job_id)]

    def _raise_for(self, response: httpx.Response) -> None:
        try:
            error = response.json()["error"]
            raise VitqApiError(response.status_code, error["code"], error["message"])
        except (ValueError, KeyError, TypeError):
            raise VitqApiError(response.status_code, "http_error", response.text[:500]) from None

    # datasets and models
    def upload_dataset(self, path: str | Path, *, on_bytes: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Upload an ``.npz`` or ImageFolder archive; ``on_bytes(n)`` is called as each chunk goes out."""
        path = Path(path)
        with open(path, "rb") as f:
            body: Any = f if on_bytes is None else _ReadCounter(f, on_bytes)
            return self._request("POST", "/v1/datasets", files={"file": (path.name, body)}).json()

    def find_dataset(self, sha256: str) -> dict[str, Any] | None:
        """This tenant's dataset with these bytes (``sha256`` of the uploaded file), if it has one."""
        return next((d for d in self.list_datasets() if d.get("sha256") == sha256), None)

    def ensure_dataset(
        self, path: str | Path, *, on_bytes: Callable[[int], None] | None = None
    ) -> tuple[dict[str, Any], bool]:
        """The dataset for a local file: the one already uploaded with the same sha256, else a new upload.
        Returns ``(dataset, uploaded)``."""
        existing = self.find_dataset(file_sha256(path))
        if existing is not None:
            return existing, False
        return self.upload_dataset(path, on_bytes=on_bytes), True

    def list_datasets(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/datasets").json()["data"]

    def delete_dataset(self, dataset_id: str) -> None:
        self._request("DELETE", f"/v1/datasets/{dataset_id}")

    def upload_model(
        self,
        path: str | Path,
        *,
        timm_name: str,
        timm_kwargs: dict[str, Any] | None = None,
        preprocess: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        path = Path(path)
        data = {"timm_name": timm_name, "timm_kwargs": json.dumps(timm_kwargs or {})}
        if preprocess is not None:
            data["preprocess"] = json.dumps(preprocess)
        with open(path, "rb") as f:
            return self._request("POST", "/v1/models", files={"file": (path.name, f)}, data=data).json()

    def delete_model(self, model_id: str) -> None:
        self._request("DELETE", f"/v1/models/{model_id}")

    def list_models(self) -> dict[str, Any]:
        return self._request("GET", "/v1/models").json()

    def results(self, **filters: Any) -> list[dict[str, Any]]:
        params = {k: v for k, v in filters.items() if v is not None}
        return self._request("GET", "/v1/results", params=params).json()["data"]

    def health(self) -> bool:
        try:
            return self._http.get("/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False
