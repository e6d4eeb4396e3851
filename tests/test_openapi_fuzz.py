"""Property test: schemathesis generates requests from the gateway's own OpenAPI schema and sends them, with a
key, to a gateway with the real worker behind it. No input may give a 500 or hang, and the worker must live.

The gateway under test (`strict_gateway`) allows at most 8 output tokens, so accepted requests stay quick."""

from __future__ import annotations

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.conftest import MODEL

MAX_EXAMPLES = 40
"""Per operation. schemathesis' pytest plugin does not run under pytest 9, so hypothesis drives
its per-operation strategies directly."""
CASES: list[int] = []
TGI_PATHS = frozenset({"/generate", "/generate_stream", "/"})
"""Routes that answer in TGI's error shape ({"error": message, "error_type"}), not OpenAI's."""


def test_no_generated_request_gets_a_500_or_hangs(strict_gateway, auth_headers):
    schema = schemathesis.openapi.from_url(f"{strict_gateway}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def no_500(case):
            reply = case.call(base_url=strict_gateway, headers=auth_headers, timeout=60)
            CASES.append(reply.status_code)
            assert reply.status_code != 500, (case.method, case.path, case.body, reply.text)
            tgi_body = isinstance(case.body, dict) and "inputs" in case.body
            tgi = case.path in TGI_PATHS or (case.path == "/invocations" and tgi_body)
            if reply.status_code >= 400 and tgi:
                assert isinstance(reply.json()["error"], str) and reply.json()["error_type"]
            elif reply.status_code >= 400:
                assert set(reply.json()["error"]) >= {"message", "type", "param", "code"}

        no_500()


def test_the_worker_survived_the_fuzzing(fleet, strict_gateway, auth_headers):
    worker = fleet.procs[0]
    assert worker.process.poll() is None
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
    assert (
        httpx.post(f"{strict_gateway}/v1/completions", json=body, headers=auth_headers, timeout=60).status_code == 200
    )
    print(f"\nschemathesis cases run: {len(CASES)}; statuses: {sorted(set(CASES))}")
