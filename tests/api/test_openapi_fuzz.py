"""Property-based fuzzing of every operation in /openapi.json (schemathesis strategies driven by
Hypothesis): whatever the input, never a 5xx, and every error is the JSON error shape.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.helpers.factories import auth

EXAMPLES_PER_OPERATION = 25


def _fuzz(operation, key: str, tried: dict[str, int]) -> None:
    label = f"{operation.method.upper()} {operation.path}"

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def run(case):
        tried[label] = tried.get(label, 0) + 1
        response = case.call(headers=auth(key))
        assert response.status_code < 500, f"{label}: {response.status_code} {response.text[:500]}"
        content_type = (response.headers.get("content-type") or [""])[0]
        has_body = operation.method.upper() != "HEAD"  # a HEAD answer has the headers only
        if response.status_code >= 400 and content_type.startswith("application/json") and has_body:
            error = response.json()["error"]
            assert error["code"] and error["message"], label

    run()


def test_no_server_errors(service):
    schema = schemathesis.openapi.from_asgi("/openapi.json", service.client.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 18
    tried: dict[str, int] = {}
    for operation in operations:
        _fuzz(operation, service.key_a, tried)
    assert len(tried) == len(operations) and all(count > 0 for count in tried.values())
    assert service.client.get("/healthz").status_code == 200


def test_unauthenticated_requests_get_401(service):
    for path in ("/v1/jobs", "/v1/datasets", "/v1/models", "/v1/results", "/v1/tenant"):
        assert service.client.get(path).status_code == 401
