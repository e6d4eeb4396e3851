"""The gateway's side of the Redis protocol (shared.keys): submit a request, follow its output, cancel it.

Nothing here is held in gateway memory between calls, so any gateway replica can follow any request.
Redis going away is waited out: the client retries each command with backoff (`connect`), and `follow` keeps
following until the request's deadline."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import APIError
from shared import keys, metrics
from shared.protocol import (
    FINISHED_BUCKET_S,
    FINISHED_WINDOW_BUCKETS,
    LIVE_WINDOW_S,
    FinalResult,
    InferenceRequest,
    TokenDelta,
)
from shared.settings import Settings

FOLLOW_BLOCK_MS = 1000
CANCEL_TTL_S = 3600
GRACE_AFTER_DEADLINE_S = 5.0
COMMAND_RETRIES = 6
"""Per command, with backoff 0.1 s doubling up to 2 s: about 8 s of Redis outage before a call fails (503)."""

log = structlog.get_logger(__name__)


def connect(redis_url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        redis_url,
        decode_responses=True,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), COMMAND_RETRIES),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


QUEUE_FULL_RETRY_AFTER_S = 10

ADD_ROUTED = """
-- KEYS: the holder worker's own stream, the shared stream, live_workers, load
-- ARGV: worker id, oldest live heartbeat, max_running, request JSON
local seen = redis.call('ZSCORE', KEYS[3], ARGV[1])
local load = tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '0')
if seen and tonumber(seen) >= tonumber(ARGV[2]) and load < tonumber(ARGV[3]) then
    redis.call('XADD', KEYS[1], '*', 'r', ARGV[4])
    return 1
end
redis.call('XADD', KEYS[2], '*', 'r', ARGV[4])
return 0
"""


def estimated_wait_s(waiting: int, finished_per_bucket: list[str | None]) -> float:
    """How long `waiting` requests take to start, at the fastest drain rate of the recent buckets (optimistic, so
    that a fleet that has just started, or just sped up, is not refused). 0 when nothing waits or no rate is known."""
    best = max((int(n) for n in finished_per_bucket if n), default=0)
    if waiting <= 0 or best == 0:
        return 0.0
    return waiting * FINISHED_BUCKET_S / best


class QueueClient:
    def __init__(self, client: aioredis.Redis, settings: Settings):
        self.redis = client
        self.settings = settings
        self._add_routed = client.register_script(ADD_ROUTED)

    async def live_workers(self, model: str) -> int:
        return await self.redis.zcount(keys.live_workers(model), time.time() - LIVE_WINDOW_S, "+inf")

    async def stream_stats(self, model: str) -> tuple[int, int, int]:
        """(entries in the model's stream, pending in group `workers`, not yet delivered) — see shared.metrics."""
        stream = keys.requests(model)
        try:
            groups = await self.redis.xinfo_groups(stream)
        except aioredis.ResponseError:  # no such stream yet: nothing was ever queued
            return 0, 0, 0
        depth = await self.redis.xlen(stream)
        group = next((g for g in groups if g["name"] == keys.WORKER_GROUP), None)
        if group is None:
            return depth, 0, depth
        pending = group["pending"]
        # Redis cannot always compute the lag; workers XDEL what they ack, so the rest of the stream is the lag.
        lag = group.get("lag")
        return depth, pending, lag if lag is not None else max(depth - pending, 0)

    async def submit(self, request: InferenceRequest) -> None:
        """Queue `request`, unless no worker serves its model, its queue is at its bound, or the wait ahead of
        it would outlast its deadline: each refused at once with 503 + Retry-After. Two round trips: the checks
        (with the conversation's last worker), then the routed XADD."""
        stream = keys.requests(request.model)
        now = time.time()
        bucket = int(now // FINISHED_BUCKET_S)
        routed = self.settings.affinity and request.conversation
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcount(keys.live_workers(request.model), now - LIVE_WINDOW_S, "+inf")
            # Workers XDEL what they finish, so the length is what is queued or running.
            pipe.xlen(stream)
            pipe.xpending(stream, keys.WORKER_GROUP)
            pipe.mget([keys.finished(request.model, bucket - i) for i in range(1, FINISHED_WINDOW_BUCKETS + 1)])
            if routed:
                pipe.get(keys.affinity(request.model, request.conversation))
            live, depth, pending, finished, *holder = await pipe.execute(raise_on_error=False)
        if self.settings.require_live_worker and not live:
            raise APIError(
                503,
                f"No worker is serving model '{request.model}' right now.",
                code="no_live_worker",
                headers={"Retry-After": "5"},
            )
        if depth >= self.settings.models[request.model].max_queue_depth:
            raise APIError(
                503,
                f"The queue for model '{request.model}' is full. Please try again later.",
                code="queue_full",
                headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)},
            )
        # No group yet (nothing ever read): everything in the stream is still waiting.
        waiting = depth - (pending["pending"] if isinstance(pending, dict) else 0)
        wait_s = estimated_wait_s(waiting, finished)
        if wait_s > request.deadline - now:
            raise APIError(
                503,
                f"The queue for model '{request.model}' would not reach this request before its deadline "
                f"(about {wait_s:.0f} s of work is waiting). Please try again later.",
                code="deadline_unreachable",
                headers={"Retry-After": str(math.ceil(wait_s - (request.deadline - now)))},
            )
        body = request.model_dump_json()
        worker = holder[0] if holder and isinstance(holder[0], str) else None
        if worker is None:
            if routed:
                metrics.AFFINITY_ROUTES.labels(request.model, "unknown").inc()
            await self.redis.xadd(stream, {"r": body})
            return
        # The worker that served this conversation's last turn holds its prefix in its KV cache: its own stream,
        # if it is live and has a free slot, else the shared stream.
        to_holder = await self._add_routed(
            keys=[keys.worker_requests(request.model, worker), stream, keys.live_workers(request.model),
                  keys.load(request.model)],
            args=[worker, time.time() - LIVE_WINDOW_S, self.settings.batch.max_running, body],
        )  # fmt: skip
        metrics.AFFINITY_ROUTES.labels(request.model, "hit" if to_holder else "unavailable").inc()

    async def follow(self, request: InferenceRequest) -> AsyncIterator[TokenDelta | FinalResult]:
        """Token deltas as the worker writes them, then the final record (always last).

        Each token is yielded once: a reclaimed request's new worker resumes after the tokens already written,
        and should two workers ever write the same positions, only the first is relayed."""
        out = keys.output(request.id)
        last = "0-0"
        relayed, flushed = 0, False
        while True:
            try:
                reply = await self.redis.xread({out: last}, block=FOLLOW_BLOCK_MS, count=256)
            except (RedisConnectionError, RedisTimeoutError) as error:
                log.warning("gateway.redis_unavailable", error=str(error))
                reply = None
                await asyncio.sleep(FOLLOW_BLOCK_MS / 1000)
            if not reply:
                if time.time() > request.deadline + GRACE_AFTER_DEADLINE_S:
                    yield await self.expire(request)
                    return
                continue
            for entry_id, fields in reply[0][1]:
                last = entry_id
                if "f" in fields:
                    yield FinalResult.model_validate_json(fields["f"])
                    return
                delta = TokenDelta.model_validate_json(fields["d"])
                # A delta without tokens is the text held back until the end (stop-string prefixes).
                if delta.completion_tokens > relayed or (not delta.token_ids and not flushed):
                    relayed = delta.completion_tokens
                    flushed = not delta.token_ids
                    yield delta

    async def result(self, request_id: str) -> FinalResult | None:
        body = await self.redis.get(keys.result(request_id))
        return None if body is None else FinalResult.model_validate_json(body)

    async def cancel(self, request_id: str) -> None:
        await self.redis.set(keys.cancel(request_id), "1", ex=CANCEL_TTL_S)

    async def expire(self, request: InferenceRequest) -> FinalResult:
        # No worker wrote an end in time (none took it, or its worker died): record the expiry, unless a
        # result landed in the meantime, and tell any worker that still holds it to drop it.
        await self.cancel(request.id)
        final = FinalResult(
            id=request.id,
            model=request.model,
            finish_reason="expired",
            error="request deadline passed",
            prompt_tokens=len(request.prompt_token_ids),
        )
        if await self.redis.set(keys.result(request.id), final.model_dump_json(), nx=True, ex=CANCEL_TTL_S):
            return final
        return await self.result(request.id) or final
