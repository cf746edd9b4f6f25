"""Fuzz the HTTP API with schemathesis: whatever a client sends, the backend answers, never with a 5xx.

Bodies and parameters are generated from the server's own OpenAPI description (plus edge cases
such as `~nosuchuser/...` paths, NaN-like numbers and huge strings that schemathesis finds); the
run is seeded and bounded (examples per operation, no shrinking), so it is repeatable and quick.
"""

from __future__ import annotations

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

EXAMPLES_PER_OPERATION = 40


def _operations(backend) -> list:
    schema = schemathesis.openapi.from_dict(httpx.get(backend.url + "/openapi.json").json())
    schema.config.update(base_url=backend.url)
    return [result.ok() for result in schema.get_all_operations()]


def test_no_request_gets_a_server_error(backend):
    headers = {"Authorization": f"Bearer {backend.token}"}
    operations = _operations(backend)
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {"POST /v1/segment", "POST /v1/train",
                                                                       "DELETE /v1/jobs/{job_id}"}
    statuses: list[int] = []
    for operation in operations:
        if operation.path == "/v1/shutdown":  # any call stops the shared backend: tested in test_server_lifecycle
            continue

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def call(case):
            response = case.call(headers=headers, timeout=30)
            statuses.append(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text)
            if response.status_code == 202:  # a generated request that is valid: do not leave it running
                backend.client.delete(f"/v1/jobs/{response.json()['job_id']}")

        call()
    # Requests were really sent, valid ones and refused ones alike.
    assert len(statuses) >= 5 * len(operations)
    assert any(200 <= code < 300 for code in statuses) and any(400 <= code < 500 for code in statuses)
