"""worker/webhooks.py: a finished job's webhook is signed (Standard Webhooks), retried and recorded."""

from __future__ import annotations

import json

import pytest

from tests.helpers.factories import auth
from tests.helpers.jobs import read_job, submit_job
from worker.webhooks import WebhookDeliveryError, deliver_once, verify


def test_webhook_signed_retried_and_recorded(service, receiver):
    url, handler = receiver
    handler.statuses.append(500)
    job_id = submit_job(service, webhook_url=url)
    assert deliver_once(service.settings, job_id) is None  # not finished: nothing to send
    service.client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(service.key_a))
    with pytest.raises(WebhookDeliveryError):
        deliver_once(service.settings, job_id)  # the receiver answers 500 first
    assert deliver_once(service.settings, job_id) is True
    secret = service.client.get("/v1/tenant", headers=auth(service.key_a)).json()["webhook_secret"]
    assert len(handler.received) == 2
    for headers, body in handler.received:
        assert verify(secret, headers, body)
        assert headers["webhook-id"] == f"msg_{job_id}_cancelled"
        assert json.loads(body)["type"] == "job.cancelled" and json.loads(body)["data"]["id"] == job_id
    headers, body = handler.received[0]
    assert not verify(secret, headers, body + b" ")  # tampered body
    assert not verify("whsec_" + "A" * 44, headers, body)  # wrong secret
    deliveries = read_job(service, job_id)["webhook"]["deliveries"]
    assert [(d["attempt"], d["ok"], d["status_code"]) for d in deliveries] == [
        (1, False, 500),
        (2, True, 200),
    ]
