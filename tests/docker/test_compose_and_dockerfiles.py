"""No Docker engine here: check docker-compose.yml and the Dockerfiles by parsing them."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_services_and_order(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "migrate", "api", "worker", "webhooks"}
    for name in ("postgres", "redis", "api", "worker", "webhooks"):
        check = services[name]["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1, name
    assert services["migrate"]["command"] == ["vitq", "migrate"]
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("api", "worker", "webhooks"):
        deps = services[name]["depends_on"]
        assert deps["migrate"] == {"condition": "service_completed_successfully"}
        assert deps["postgres"] == {"condition": "service_healthy"}
        assert deps["redis"] == {"condition": "service_healthy"}
    assert services["api"]["command"][:2] == ["vitq", "api"]
    assert services["worker"]["command"][:2] == ["vitq", "worker"]
    # webhooks have their own consumer (CPU image), never behind the GPU worker's jobs
    assert services["webhooks"]["command"][:2] == ["vitq", "webhooks"]
    assert services["webhooks"]["image"] == services["api"]["image"]
    assert "8000:8000" in services["api"]["ports"]


def test_compose_gpu_worker(compose):
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert worker["environment"]["CUDA_VISIBLE_DEVICES"] == "0"


def test_compose_environment_is_settings(compose):
    fields = {f"VITQ_{name.upper()}" for name in Settings.model_fields}
    for name in ("migrate", "api", "worker", "webhooks"):
        env = compose["services"][name]["environment"]
        assert env["VITQ_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["VITQ_BROKER_URL"].startswith("redis://redis:6379")
        unknown = {k for k in env if k.startswith("VITQ_")} - fields
        assert not unknown, f"{name}: {unknown} are not settings"
    # api and worker share the artifact store
    assert compose["services"]["api"]["volumes"] == compose["services"]["worker"]["volumes"]
    assert set(compose["volumes"]) >= {"pgdata", "artifacts"}
    # the database credentials agree with the postgres service
    pg = compose["services"]["postgres"]["environment"]
    url = compose["services"]["api"]["environment"]["VITQ_DATABASE_URL"]
    assert f"{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}" in url


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    text = path.read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


@pytest.mark.parametrize("name", ["api.Dockerfile", "worker.Dockerfile"])
def test_dockerfile(name, compose):
    path = REPO / "docker" / name
    instructions = parse_dockerfile(path)
    known = {"FROM", "RUN", "ENV", "WORKDIR", "COPY", "USER", "EXPOSE", "HEALTHCHECK", "CMD", "ARG", "LABEL"}
    assert {k for k, _ in instructions} <= known
    assert instructions[0][0] == "FROM"
    copied: set[str] = set()
    for keyword, rest in instructions:
        if keyword == "COPY":
            *sources, _dest = shlex.split(rest)
            for source in sources:
                assert (REPO / source).exists(), f"{name}: COPY {source} does not exist"
            copied.update(sources)
    # every package pyproject.toml installs is in the image (a new top-level package must be copied)
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    missing = {p.rstrip("*") for p in packages["include"]} - copied
    assert not missing, f"{name}: packages not copied: {sorted(missing)}"
    users = [rest for k, rest in instructions if k == "USER"]
    assert users and users[-1] not in ("root", "0"), "runs as root"
    cmd = [rest for k, rest in instructions if k == "CMD"][-1]
    assert cmd.startswith('["vitq",')
    runs = " ".join(rest for k, rest in instructions if k == "RUN")
    assert re.search(r"pip install \.", runs), "the project itself is installed"
    assert "torch==2.14.1" in runs
    # every file the image builds from is listed in the compose build section that names it
    builds = {s["build"]["dockerfile"] for s in compose["services"].values() if "build" in s}
    assert f"docker/{name}" in builds
    if name == "worker.Dockerfile":
        assert instructions[0][1].startswith("nvidia/cuda:")
        assert "/whl/cu" in runs
    else:
        assert "/whl/cpu" in runs
        assert any(k == "EXPOSE" and r == "8000" for k, r in instructions)
