"""Per-key limits enforced in Redis, so they hold whichever gateway replica a request reaches."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import MODEL
from tests.fleet import create_api_key, wait_until
from tests.test_validation import assert_openai_error

TINY = {"model": MODEL, "prompt": "Hello", "max_tokens": 1, "temperature": 0}


def headers_for(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_rpm_holds_across_two_gateways(fleet, gateway_url, second_gateway_url):
    headers = headers_for(create_api_key(fleet.redis_server, name="rpm-10", rpm=10))
    gateways = [gateway_url, second_gateway_url]
    remaining = []
    for i in range(10):
        reply = httpx.post(f"{gateways[i % 2]}/v1/completions", json=TINY, headers=headers, timeout=120)
        assert reply.status_code == 200, reply.text
        remaining.append(int(reply.headers["x-ratelimit-remaining-requests"]))
    assert remaining == list(range(9, -1, -1))
    for url in gateways:  # the 11th and 12th, one on each replica
        refused = httpx.post(f"{url}/v1/completions", json=TINY, headers=headers, timeout=120)
        error = assert_openai_error(refused, 429)
        assert error["code"] == "rate_limit_exceeded" and "RPM" in error["message"]
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["x-ratelimit-limit-requests"] == "10"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.headers["x-ratelimit-reset-requests"]


@pytest.mark.parametrize("stream", [False, True])
def test_output_tokens_are_charged_to_the_token_limit(fleet, gateway_url, second_gateway_url, stream):
    # 20 tokens a minute: the prompt fits, but 40 forced output tokens leave the bucket deep in debt.
    headers = headers_for(create_api_key(fleet.redis_server, name="tpm-20", tpm=20))
    body = {**TINY, "max_tokens": 40, "ignore_eos": True, "stream": stream}
    first = httpx.post(f"{gateway_url}/v1/completions", json=body, headers=headers, timeout=120)
    assert first.status_code == 200, first.text
    refused = httpx.post(f"{second_gateway_url}/v1/completions", json=TINY, headers=headers, timeout=120)
    error = assert_openai_error(refused, 429)
    assert "TPM" in error["message"]
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert int(refused.headers["retry-after"]) > 1


def test_a_prompt_larger_than_the_token_limit_is_refused(fleet, gateway_url):
    headers = headers_for(create_api_key(fleet.redis_server, name="tpm-5", tpm=5))
    body = {**TINY, "prompt": "one two three four five six seven eight nine ten"}
    error = assert_openai_error(httpx.post(f"{gateway_url}/v1/completions", json=body, headers=headers), 429)
    assert error["code"] == "request_too_large"


def test_concurrent_requests_beyond_the_limit_are_refused_until_one_ends(fleet, gateway_url, second_gateway_url):
    headers = headers_for(create_api_key(fleet.redis_server, name="one-at-a-time", max_concurrency=1))
    long = {**TINY, "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{gateway_url}/v1/completions", json=long, headers=headers, timeout=120) as running:
        assert running.status_code == 200
        lines = running.iter_lines()  # held: dropping the iterator would close the connection
        next(lines)
        refused = httpx.post(f"{second_gateway_url}/v1/completions", json=TINY, headers=headers, timeout=120)
        assert assert_openai_error(refused, 429)["code"] == "concurrency_limit_exceeded"
        assert refused.headers["retry-after"]
    # Closing the stream releases its slot.
    wait_until(
        lambda: (
            httpx.post(f"{second_gateway_url}/v1/completions", json=TINY, headers=headers, timeout=120).status_code
            == 200
        ),
        30,
        "the slot to be released",
        interval=0.3,
    )


def test_a_job_is_charged_its_max_tokens_up_front(fleet, gateway_url, second_gateway_url):
    # No gateway relays a job's tokens, so its bound is taken at admission: the second 40-token job does not fit.
    headers = headers_for(create_api_key(fleet.redis_server, name="tpm-60-jobs", tpm=60))
    body = {**TINY, "max_tokens": 40}
    first = httpx.post(f"{gateway_url}/v1/jobs", json=body, headers=headers, timeout=30)
    assert first.status_code == 202, first.text
    refused = httpx.post(f"{second_gateway_url}/v1/jobs", json=body, headers=headers, timeout=30)
    assert "TPM" in assert_openai_error(refused, 429)["message"]
