"""Async jobs: submit through one gateway replica, read through another."""

from __future__ import annotations

import httpx

from tests.conftest import MODEL
from tests.fleet import wait_until

FRANCE = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0}


def test_job_submitted_to_one_gateway_is_read_through_another(gateway_url, second_gateway_url, auth_headers):
    submitted = httpx.post(f"{gateway_url}/v1/jobs", json=FRANCE, headers=auth_headers, timeout=30)
    assert submitted.status_code == 202
    job = submitted.json()
    assert submitted.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] in ("queued", "running")

    def completed():
        view = httpx.get(f"{second_gateway_url}/v1/jobs/{job['id']}", headers=auth_headers, timeout=10).json()
        return view if view["status"] == "completed" else None

    view = wait_until(completed, 60, "the job to complete")
    result = view["result"]
    assert result["object"] == "chat.completion"
    assert "Paris" in result["choices"][0]["message"]["content"]
    assert result["usage"]["completion_tokens"] > 0


def test_unknown_job_is_404(http):
    reply = http.get("/v1/jobs/nope")
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "job_not_found"
