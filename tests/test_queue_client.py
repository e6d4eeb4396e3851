"""Admission control: no live worker or a full queue is refused at once with 503 + Retry-After."""

from __future__ import annotations

import time

import httpx

from shared import keys
from tests.conftest import PARKED
from tests.test_validation import assert_openai_error

BODY = {"model": PARKED, "prompt": "Hello", "max_tokens": 1}


def test_no_live_worker_is_503_at_once(strict_gateway, auth_headers):
    # A 2 s client timeout turns a hang into a failure; the gateway itself never waits for a worker.
    reply = httpx.post(f"{strict_gateway}/v1/completions", json=BODY, headers=auth_headers, timeout=2)
    assert assert_openai_error(reply, 503)["code"] == "no_live_worker"
    assert reply.headers["retry-after"]


def test_a_queue_at_its_bound_is_503_with_retry_after(fleet, strict_gateway, auth_headers):
    redis = fleet.redis_server.client()
    # A worker that beats but never reads: what is submitted stays queued. PARKED's bound is 2.
    redis.zadd(keys.live_workers(PARKED), {"parked-worker": time.time() + 60})
    try:
        for _ in range(2):
            reply = httpx.post(f"{strict_gateway}/v1/jobs", json=BODY, headers=auth_headers, timeout=10)
            assert reply.status_code == 202, reply.text
        refused = httpx.post(f"{strict_gateway}/v1/jobs", json=BODY, headers=auth_headers, timeout=10)
        assert assert_openai_error(refused, 503)["code"] == "queue_full"
        assert int(refused.headers["retry-after"]) >= 1
    finally:
        redis.delete(keys.live_workers(PARKED), keys.requests(PARKED))
