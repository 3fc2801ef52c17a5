"""The webhook SSRF guard (service/webhook_targets.py) at submit and at delivery.

No packet leaves 127.0.0.0/8 or ::1 here: name resolution is replaced in-process (the guard's
``resolve``), and every test in this module runs with ``socket.connect`` refusing any other address, so a
guard that let a refused target through would fail the test instead of sending anything.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest
from fastapi.testclient import TestClient

from service import webhook_targets
from service.webhook_targets import WebhookTargetError, check
from tests.helpers import make_settings
from tests.helpers.factories import auth
from tests.helpers.jobs import SMOKE, read_job, submit_job
from worker.webhooks import WebhookRefused, build_request, deliver_once

PUBLIC = "93.184.216.34"  # never contacted: only resolved to, and checked


@pytest.fixture(autouse=True)
def only_loopback_connections(monkeypatch):
    """Any connection to an address outside 127.0.0.0/8 and ::1 fails the test before a packet is sent."""
    real_connect = socket.socket.connect
    attempts: list[str] = []

    def guarded(self, address):  # noqa: ANN001
        host = address[0] if isinstance(address, tuple) else None
        if host is not None:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
            if not ip.is_loopback:
                attempts.append(host)
                raise AssertionError(f"the test tried to connect to {host}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    yield attempts
    assert attempts == []


@pytest.fixture
def names(monkeypatch):
    """A DNS of the test's own: ``names[host] = [addresses]`` (anything else does not resolve)."""
    table: dict[str, list[str]] = {}

    def resolve(host: str, port: int) -> list[str]:
        if host in ("127.0.0.1", "::1"):
            return [host]
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(table[host])

    monkeypatch.setattr(webhook_targets, "resolve", resolve)
    return table


GUARDED = make_settings  # the guard on: allow_private off, default ports


@pytest.mark.parametrize(
    "url, why",
    [
        ("http://127.0.0.1:8080/hook", "127.0.0.1 is an internal address (loopback)"),
        ("http://[::1]:8080/hook", "::1 is an internal address (loopback)"),
        ("http://10.1.2.3/hook", "10.1.2.3 is an internal address (private or reserved)"),
        ("http://192.168.0.10/hook", "private or reserved"),
        ("http://169.254.169.254/latest/meta-data/", "link-local (cloud metadata"),
        ("http://[fd00::1]/hook", "IPv6 unique-local"),
        ("http://[fe80::1]/hook", "link-local"),
        ("http://224.0.0.1/hook", "multicast"),
        ("http://0.0.0.0/hook", "unspecified"),
        ("http://[::ffff:10.0.0.1]/hook", "(private or reserved: 10.0.0.1, embedded in an IPv6 address)"),
        ("http://100.64.1.1/hook", "private or reserved"),
        ("http://loopback.test:8080/hook", "resolves to 127.0.0.1, which is an internal address (loopback)"),
        ("http://mixed.test/hook", "'mixed.test' resolves to 10.9.9.9"),
        ("http://nowhere.test/hook", "does not resolve"),
        ("ftp://hooks.test/hook", "must be http or https"),
        ("http://hooks.test:22/hook", "port 22 is not allowed"),
        ("http://user:secret@hooks.test/hook", "must not carry credentials"),
    ],
)
def test_internal_and_disallowed_targets_are_refused(tmp_path, names, url, why):
    names.update({"loopback.test": ["127.0.0.1"], "mixed.test": [PUBLIC, "10.9.9.9"], "hooks.test": [PUBLIC]})
    with pytest.raises(WebhookTargetError) as refused:
        check(url, GUARDED(tmp_path))
    assert why in str(refused.value)


def test_public_target_is_pinned_to_the_checked_address(tmp_path, names):
    names["hooks.test"] = [PUBLIC]
    target = check("https://hooks.test/in?x=1", GUARDED(tmp_path))
    assert target.pinned_url == f"https://{PUBLIC}:443/in?x=1"
    with httpx.Client() as client:  # the request is built, never sent
        request = build_request(client, target, b"{}", {"content-type": "application/json"})
    assert str(request.url) == f"https://{PUBLIC}/in?x=1"
    assert request.headers["host"] == "hooks.test"
    assert request.extensions["sni_hostname"] == "hooks.test"  # TLS name and certificate: the name


def test_allow_private_lets_an_operator_reach_internal_targets(tmp_path, names):
    names["receiver.test"] = ["127.0.0.1"]
    settings = make_settings(tmp_path, webhook_allow_private=True, webhook_ports="*")
    assert check("http://receiver.test:9/hook", settings).pinned_url == "http://127.0.0.1:9/hook"
    assert check("http://10.1.2.3:8080/x", settings).host == "10.1.2.3"  # checked, not contacted
    with pytest.raises(WebhookTargetError, match="must be http or https"):
        check("file:///etc/passwd", settings)


@pytest.fixture(scope="module")
def guarded_api(tmp_path_factory, migrated_pg):
    """The API with the guard as shipped (VITQ_WEBHOOK_ALLOW_PRIVATE off)."""
    import secrets

    from api.app import create_app
    from service.db import session_scope
    from service.keys import create_key

    settings = make_settings(tmp_path_factory.mktemp("guarded"), migrated_pg)
    assert settings.webhook_allow_private is False
    with session_scope(migrated_pg) as session:
        key = create_key(session, tenant_name=f"guarded-{secrets.token_hex(3)}").key
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client, key, settings


@pytest.mark.parametrize(
    "url, why",
    [
        ("http://127.0.0.1:8080/hook", "loopback"),
        ("http://[::1]:8080/hook", "loopback"),
        ("http://10.0.0.5/hook", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://loopback.test:8080/hook", "resolves to 127.0.0.1"),
    ],
)
def test_submit_refuses_internal_webhook_url_with_422(guarded_api, names, url, why):
    client, key, _ = guarded_api
    names["loopback.test"] = ["127.0.0.1"]
    response = client.post("/v1/jobs", json=SMOKE | {"webhook_url": url}, headers=auth(key))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "webhook_url_refused" and why in error["message"]
    assert client.get("/v1/jobs", headers=auth(key)).json()["data"] == []  # nothing created


def test_rebinding_to_an_internal_address_is_refused_at_delivery(guarded_api, names):
    """Public when submitted, 169.254.169.254 when delivered: checked again, refused, not retried."""
    client, key, settings = guarded_api
    names["rebind.test"] = [PUBLIC]
    response = client.post(
        "/v1/jobs", json=SMOKE | {"webhook_url": "http://rebind.test/hook"}, headers=auth(key)
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key)).status_code == 202
    names["rebind.test"] = ["169.254.169.254"]
    with pytest.raises(WebhookRefused, match="resolves to 169.254.169.254"):
        deliver_once(settings, job_id)
    [delivery] = client.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()["webhook"]["deliveries"]
    assert delivery["ok"] is False and delivery["status_code"] is None
    assert "link-local" in delivery["error"]


def test_a_name_resolving_to_loopback_is_delivered_to_the_checked_address(service, receiver, names):
    """With internal targets allowed (the operator's switch), the connection goes to the address that
    was checked, and the receiver sees the name in Host."""
    url, handler = receiver
    port = url.split(":")[2].split("/")[0]
    names["receiver.test"] = ["127.0.0.1"]
    job_id = submit_job(service, webhook_url=f"http://receiver.test:{port}/hook")
    service.client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(service.key_a))
    assert deliver_once(service.settings, job_id) is True
    [(headers, body)] = handler.received
    assert headers["host"] == f"receiver.test:{port}" and json.loads(body)["data"]["id"] == job_id


class _Redirector(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_POST(self):  # noqa: N802
        type(self).hits.append(self.path)
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(302)
        self.send_header("Location", "http://169.254.169.254/latest/meta-data/iam/")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_redirect_to_an_internal_address_is_not_followed(service):
    _Redirector.hits = []
    server = HTTPServer(("127.0.0.1", 0), _Redirector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        job_id = submit_job(service, webhook_url=f"http://127.0.0.1:{server.server_address[1]}/hook")
        service.client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(service.key_a))
        with pytest.raises(WebhookRefused, match="redirects are not followed"):
            deliver_once(service.settings, job_id)
    finally:
        server.shutdown()
    assert _Redirector.hits == ["/hook"]  # one POST, and nothing to 169.254.169.254 (the connect guard)
    [delivery] = read_job(service, job_id)["webhook"]["deliveries"]
    assert delivery["status_code"] == 302 and not delivery["ok"]
