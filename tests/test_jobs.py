"""Async jobs: submit through one gateway replica, read through another."""

from __future__ import annotations

import httpx

from tests.conftest import MODEL
from tests.fleet import create_api_key, wait_until

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


def test_a_job_is_invisible_to_another_key(fleet, gateway_url, second_gateway_url, auth_headers):
    job = httpx.post(f"{gateway_url}/v1/jobs", json=FRANCE, headers=auth_headers, timeout=30).json()
    other = {"Authorization": f"Bearer {create_api_key(fleet.redis_server, name='other-tenant')}"}
    for url in (gateway_url, second_gateway_url):
        read = httpx.get(f"{url}/v1/jobs/{job['id']}", headers=other, timeout=10)
        assert read.status_code == 404 and read.json()["error"]["code"] == "job_not_found"
        cancel = httpx.delete(f"{url}/v1/jobs/{job['id']}", headers=other, timeout=10)
        assert cancel.status_code == 404
    assert httpx.get(f"{gateway_url}/v1/jobs/{job['id']}", headers=auth_headers, timeout=10).status_code == 200
