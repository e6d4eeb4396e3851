"""Admission control: no live worker, a full queue, or a wait past the deadline is refused at once with 503 +
Retry-After."""

from __future__ import annotations

import asyncio
import time

import httpx

from gateway.serving import TIMEOUT_HEADER
from shared import keys
from shared.protocol import FINISHED_BUCKET_S
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


def test_requests_racing_for_the_last_places_never_exceed_the_queue_bound(fleet, strict_gateway, auth_headers):
    redis = fleet.redis_server.client()
    redis.zadd(keys.live_workers(PARKED), {"parked-worker": time.time() + 60})

    async def race() -> list[int]:
        async with httpx.AsyncClient(timeout=10) as client:
            replies = await asyncio.gather(
                *(client.post(f"{strict_gateway}/v1/jobs", json=BODY, headers=auth_headers) for _ in range(6))
            )
        return sorted(r.status_code for r in replies)

    try:
        # The checks and the XADD are one script: of six at once, exactly PARKED's bound of 2 are queued.
        assert asyncio.run(race()) == [202, 202, 503, 503, 503, 503]
        assert redis.xlen(keys.requests(PARKED)) == 2
    finally:
        redis.delete(keys.live_workers(PARKED), keys.requests(PARKED))


def test_a_wait_longer_than_the_deadline_is_refused_at_once(fleet, strict_gateway, auth_headers):
    redis = fleet.redis_server.client()
    redis.zadd(keys.live_workers(PARKED), {"parked-worker": time.time() + 60})
    # One request waits; the workers ended 2 requests per 10 s bucket lately: about 5 s of queue ahead.
    redis.xadd(keys.requests(PARKED), {"r": "{}"})
    bucket = int(time.time() // FINISHED_BUCKET_S)
    for back in (1, 2):
        redis.set(keys.finished(PARKED, bucket - back), 2, ex=120)
    try:
        hurried = {**auth_headers, TIMEOUT_HEADER: "2"}
        refused = httpx.post(f"{strict_gateway}/v1/completions", json=BODY, headers=hurried, timeout=5)
        assert assert_openai_error(refused, 503)["code"] == "deadline_unreachable"
        assert int(refused.headers["retry-after"]) >= 3
        patient = {**auth_headers, TIMEOUT_HEADER: "60"}
        accepted = httpx.post(f"{strict_gateway}/v1/jobs", json=BODY, headers=patient, timeout=10)
        assert accepted.status_code == 202, accepted.text
    finally:
        redis.delete(keys.live_workers(PARKED), keys.requests(PARKED))


def test_a_malformed_timeout_header_is_400(strict_gateway, auth_headers):
    for value in ("soon", "0", "-3", "inf"):
        reply = httpx.post(
            f"{strict_gateway}/v1/completions", json=BODY, headers={**auth_headers, TIMEOUT_HEADER: value}, timeout=5
        )
        assert assert_openai_error(reply, 400)["param"] == TIMEOUT_HEADER
