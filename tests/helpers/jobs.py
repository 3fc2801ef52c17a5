"""Jobs for the in-process tests: submit one through the API, read it back, and poke its row."""

from __future__ import annotations

from sqlalchemy import update

from service.db import session_scope
from service.tables import Job
from tests.helpers.factories import auth

SMOKE = {
    "model": "fmnist-vit-tiny",
    "w_bits": 4,
    "a_bits": 4,
    "preset": "smoke",
    "calibration": "fashion-mnist:train:32",
}


def submit_job(service, **extra) -> str:
    response = service.client.post("/v1/jobs", json=SMOKE | extra, headers=auth(service.key_a))
    assert response.status_code == 202, response.text
    return response.json()["id"]


def set_job_row(service, job_id: str, **values) -> None:
    """Fake what the tests cannot wait for (a stopped heartbeat, an exhausted attempt counter)."""
    with session_scope(service.settings.resolved_database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def read_job(service, job_id: str) -> dict:
    return service.client.get(f"/v1/jobs/{job_id}", headers=auth(service.key_a)).json()
