"""Fuzz the HTTP API with schemathesis: whatever a client sends, the backend answers, never with a 5xx.

Bodies and parameters are generated from the server's own OpenAPI description (plus edge cases
such as `~nosuchuser/...` paths, NaN-like numbers and huge strings that schemathesis finds); the
run is seeded and bounded (examples per operation, no shrinking), so it is repeatable and quick.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings

EXAMPLES_PER_OPERATION = 40


@pytest.fixture(scope="module")
def api_schema(backend):
    schema = schemathesis.openapi.from_dict(httpx.get(backend.url + "/openapi.json").json())
    schema.config.base_url = backend.url
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case, backend):
    response = case.call(headers={"Authorization": f"Bearer {backend.token}"}, timeout=30)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text)
    if response.status_code == 202:  # a generated request that is valid: do not leave it running
        backend.client.delete(f"/v1/jobs/{response.json()['job_id']}")
