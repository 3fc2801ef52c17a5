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
from typing import Any

import httpx

FINISHED = {"succeeded", "failed", "cancelled"}
DEFAULT_URL = "http://127.0.0.1:8000"


class VitqApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


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
            raise VitqApiError(response.status_code, code, message)
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
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll)

    # artifacts
    def list_artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self._request("GET", f"/v1/jobs/{job_id}/artifacts").json()["data"]

    def download_artifact(self, job_id: str, name: str, dest: str | Path) -> Path:
        """Stream an artifact to ``dest`` (a file or directory) and check its sha256 against the ETag."""
        dest = Path(dest)
        target = dest / name if dest.is_dir() else dest
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
    def upload_dataset(self, path: str | Path) -> dict[str, Any]:
        path = Path(path)
        with open(path, "rb") as f:
            return self._request("POST", "/v1/datasets", files={"file": (path.name, f)}).json()

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
