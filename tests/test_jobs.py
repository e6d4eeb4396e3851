"""Async jobs: submit through one gateway replica, read through another."""

from __future__ import annotations

import signal
import uuid

import httpx
import pytest

from shared import keys
from shared.protocol import FinalResult
from tests.conftest import FRANCE_QUESTION, MODEL
from tests.fleet import create_api_key, wait_until

FRANCE = {"model": MODEL, "messages": [{"role": "user", "content": FRANCE_QUESTION}], "temperature": 0}


def test_job_submitted_to_one_gateway_is_read_through_another(gateway_url, second_gateway_url, auth_headers):
    body = {**FRANCE, "logprobs": True}
    submitted = httpx.post(f"{gateway_url}/v1/jobs", json=body, headers=auth_headers, timeout=30)
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
    assert len(result["choices"][0]["logprobs"]["content"]) == result["usage"]["completion_tokens"]


def test_a_job_of_several_choices_and_prompts_answers_them_all_and_cancels_them_all(http):
    job = http.post("/v1/jobs", json={"model": MODEL, "prompt": ["One, two,", "A, B,"], "max_tokens": 3, "n": 2})
    assert job.status_code == 202, job.text

    def ended():
        view = http.get(f"/v1/jobs/{job.json()['id']}").json()
        return view if view["status"] not in ("queued", "running") else None

    view = wait_until(ended, 60, "the job to end")
    assert view["status"] == "completed", view
    assert [c["index"] for c in view["result"]["choices"]] == [0, 1, 2, 3]
    assert view["result"]["usage"]["completion_tokens"] == 12
    long = http.post("/v1/jobs", json={**FRANCE, "max_tokens": 2000, "ignore_eos": True, "n": 3}).json()
    assert http.delete(f"/v1/jobs/{long['id']}").json()["status"] in ("queued", "running", "cancelled")
    view = wait_until(
        lambda: (v := http.get(f"/v1/jobs/{long['id']}").json())["status"] == "cancelled" and v, 60, "cancelled"
    )
    assert view["error"]["message"]


def test_unknown_job_is_404(http):
    reply = http.get("/v1/jobs/nope")
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "job_not_found"


AUTH: dict[str, str] = {}
"""The session fleet's API key header (the fleet requires keys), filled in by `_with_key`."""


@pytest.fixture(autouse=True)
def _with_key(auth_headers):
    AUTH.update(auth_headers)


def _job(url: str, job_id: str) -> dict:
    return httpx.get(f"{url}/v1/jobs/{job_id}", headers=AUTH, timeout=10).json()


def _wait_status(url: str, job_id: str, statuses: tuple[str, ...], timeout: float = 60) -> dict:
    return wait_until(lambda: (v := _job(url, job_id))["status"] in statuses and v, timeout, f"job in {statuses}")


def test_retried_submit_with_the_same_idempotency_key_returns_the_same_job(gateway_url, second_gateway_url):
    headers = {"Idempotency-Key": f"retry-{uuid.uuid4().hex}"}
    first = httpx.post(f"{gateway_url}/v1/jobs", json=FRANCE, headers={**AUTH, **headers}, timeout=30)
    again = httpx.post(f"{second_gateway_url}/v1/jobs", json=FRANCE, headers={**AUTH, **headers}, timeout=30)
    other = httpx.post(f"{gateway_url}/v1/jobs", json=FRANCE, headers=AUTH, timeout=30)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert other.json()["id"] != first.json()["id"]
    changed = httpx.post(
        f"{gateway_url}/v1/jobs", json={**FRANCE, "max_tokens": 3}, headers={**AUTH, **headers}, timeout=30
    )
    assert changed.status_code == 422
    assert changed.json()["error"]["code"] == "idempotency_key_reused"


def test_cancelled_queued_job_never_runs(fleet, gateway_url, redis_server):
    worker = fleet.procs[0].process
    worker.send_signal(signal.SIGSTOP)  # the job stays in the stream while the worker is frozen
    try:
        job = httpx.post(f"{gateway_url}/v1/jobs", json=FRANCE, headers=AUTH, timeout=30).json()
        assert httpx.delete(f"{gateway_url}/v1/jobs/{job['id']}", headers=AUTH, timeout=10).status_code == 200
    finally:
        worker.send_signal(signal.SIGCONT)
    view = _wait_status(gateway_url, job["id"], ("cancelled", "completed"))
    assert view["status"] == "cancelled"
    final = FinalResult.model_validate_json(redis_server.client().get(keys.result(job["id"])))
    assert final.completion_tokens == 0
    assert not redis_server.client().xrange(keys.output(job["id"]), count=1)[0][1].get("d")


def test_cancelled_running_job_stops_early_and_frees_its_slot(gateway_url, redis_server):
    long = {**FRANCE, "max_tokens": 2000, "ignore_eos": True}
    job = httpx.post(f"{gateway_url}/v1/jobs", json=long, headers=AUTH, timeout=30).json()
    _wait_status(gateway_url, job["id"], ("running",))
    assert httpx.delete(f"{gateway_url}/v1/jobs/{job['id']}", headers=AUTH, timeout=10).json()["status"] in (
        "running",
        "cancelled",
    )
    view = _wait_status(gateway_url, job["id"], ("cancelled",))
    assert view["error"]["code"] == "request_cancelled"
    final = FinalResult.model_validate_json(redis_server.client().get(keys.result(job["id"])))
    assert 0 < final.completion_tokens < 2000
    # The scheduler dropped it, so nothing of it is running any more: a new job runs to the end.
    after = httpx.post(f"{gateway_url}/v1/jobs", json={**FRANCE, "max_tokens": 4}, headers=AUTH, timeout=30).json()
    assert _wait_status(gateway_url, after["id"], ("completed",))["result"]["usage"]["completion_tokens"] > 0


def test_result_reads_expired_after_its_retention(fleet):
    short_retention = fleet.gateway(LLMFLEET_RESULT_TTL_S="1")
    job = httpx.post(
        f"{short_retention.url}/v1/jobs", json={**FRANCE, "max_tokens": 2}, headers=AUTH, timeout=30
    ).json()
    view = _wait_status(short_retention.url, job["id"], ("completed", "expired"))
    view = _wait_status(short_retention.url, job["id"], ("expired",), timeout=10)
    assert view["result"] is None
    assert httpx.get(f"{short_retention.url}/v1/jobs/{job['id']}", headers=AUTH, timeout=10).status_code == 200


def test_a_job_is_invisible_to_another_key(fleet, gateway_url, second_gateway_url, auth_headers):
    job = httpx.post(f"{gateway_url}/v1/jobs", json=FRANCE, headers=auth_headers, timeout=30).json()
    other = {"Authorization": f"Bearer {create_api_key(fleet.redis_server, name='other-tenant')}"}
    for url in (gateway_url, second_gateway_url):
        read = httpx.get(f"{url}/v1/jobs/{job['id']}", headers=other, timeout=10)
        assert read.status_code == 404 and read.json()["error"]["code"] == "job_not_found"
        cancel = httpx.delete(f"{url}/v1/jobs/{job['id']}", headers=other, timeout=10)
        assert cancel.status_code == 404
    assert httpx.get(f"{gateway_url}/v1/jobs/{job['id']}", headers=auth_headers, timeout=10).status_code == 200
