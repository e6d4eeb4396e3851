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
MAX_LANES = 16
"""The most priority values other than 0 whose lanes a model's queue keeps (scheduling_policy "priority")."""

SUBMIT = """
-- The admission checks and the XADD in one round trip.
-- KEYS: the request's lane (its priority's stream), live_workers, load, the conversation's affinity key ('' for
--       none), the model's lanes registry, its 0 lane, then the finished-count buckets of the recent past
-- ARGV: oldest live heartbeat, require a live worker (1/0), queue bound, seconds to the deadline, bucket seconds,
--       the workers' group, a worker's own stream less its id, max_running, the request JSON, its priority,
--       the most lanes besides the 0 one
-- Returns {outcome, figure}: 'refused_no_worker' | 'refused_full' | 'refused_lanes' | 'refused_late' (figure: the
-- estimated wait, seconds) | 'shared' (no conversation) | 'unknown' (no holder known) | 'hit' (to the holder's own
-- stream) | 'unavailable' (holder dead or full: shared stream).
local lane, priority = KEYS[1], tonumber(ARGV[10])
if ARGV[2] == '1' and redis.call('ZCOUNT', KEYS[2], ARGV[1], '+inf') == 0 then
    return {'refused_no_worker', '0'}
end
local lanes = {KEYS[6], 0}
local registered = redis.call('ZRANGE', KEYS[5], 0, -1, 'WITHSCORES')
for i = 1, #registered do
    lanes[#lanes + 1] = registered[i]
end
-- Workers XDEL what they finish, so a lane's length is what is queued or running. What waits ahead of this
-- request: the entries not yet delivered in the lanes of its priority and more urgent ones.
local depth, waiting, known = 0, 0, false
for i = 1, #lanes, 2 do
    local length = redis.call('XLEN', lanes[i])
    depth = depth + length
    known = known or lanes[i] == lane
    if tonumber(lanes[i + 1]) <= priority then
        waiting = waiting + length
        local pending = redis.pcall('XPENDING', lanes[i], ARGV[6])
        if type(pending) == 'table' and not pending.err then
            waiting = waiting - pending[1]
        end
    end
end
if depth >= tonumber(ARGV[3]) then
    return {'refused_full', '0'}
end
if not known and #registered / 2 >= tonumber(ARGV[11]) then
    return {'refused_lanes', '0'}
end
-- The wait ahead, at the fastest drain rate of the recent buckets (optimistic, so that a fleet that has just
-- started, or just sped up, is not refused).
local best = 0
for i = 7, #KEYS do
    best = math.max(best, tonumber(redis.call('GET', KEYS[i]) or '0'))
end
if waiting > 0 and best > 0 then
    local wait_s = waiting * tonumber(ARGV[5]) / best
    if wait_s > tonumber(ARGV[4]) then
        return {'refused_late', tostring(wait_s)}
    end
end
if not known then
    -- A new lane, with its group from the start (id 0: what is added before a worker reads it is served).
    redis.call('ZADD', KEYS[5], priority, lane)
    redis.pcall('XGROUP', 'CREATE', lane, ARGV[6], '0', 'MKSTREAM')
end
if KEYS[4] == '' then
    redis.call('XADD', lane, '*', 'r', ARGV[9])
    return {'shared', '0'}
end
-- The worker that served this conversation's last turn holds its prefix in its KV cache: its own stream, if it
-- is live and has a free slot, else the lane.
local worker = redis.call('GET', KEYS[4])
if not worker then
    redis.call('XADD', lane, '*', 'r', ARGV[9])
    return {'unknown', '0'}
end
local seen = redis.call('ZSCORE', KEYS[2], worker)
local load = tonumber(redis.call('HGET', KEYS[3], worker) or '0')
if seen and tonumber(seen) >= tonumber(ARGV[1]) and load < tonumber(ARGV[8]) then
    redis.call('XADD', ARGV[7] .. worker, '*', 'r', ARGV[9])
    return {'hit', '0'}
end
redis.call('XADD', lane, '*', 'r', ARGV[9])
return {'unavailable', '0'}
"""


class QueueClient:
    def __init__(self, client: aioredis.Redis, settings: Settings):
        self.redis = client
        self.settings = settings
        self._submit = client.register_script(SUBMIT)

    async def live_workers(self, model: str) -> int:
        return await self.redis.zcount(keys.live_workers(model), time.time() - LIVE_WINDOW_S, "+inf")

    async def stream_stats(self, model: str) -> tuple[int, int, int]:
        """(entries in the model's lanes, pending in group `workers`, not yet delivered) — see shared.metrics."""
        registered = await self.redis.zrange(keys.lanes(model), 0, -1, withscores=True)
        totals = [0, 0, 0]
        for lane in keys.ordered_lanes(model, registered):
            for i, figure in enumerate(await self._lane_stats(lane)):
                totals[i] += figure
        return totals[0], totals[1], totals[2]

    async def _lane_stats(self, stream: str) -> tuple[int, int, int]:
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
        """Queue `request` in its priority's lane, unless no worker serves its model, its queue is at its bound, or
        the wait ahead of it would outlast its deadline: each refused at once with 503 + Retry-After (a new lane past
        MAX_LANES with 400). One round trip (SUBMIT)."""
        model = request.model
        now = time.time()
        bucket = int(now // FINISHED_BUCKET_S)
        # Only priority 0's go to a worker's own stream, which it reads in the 0 lane's place (worker.lanes).
        routed = self.settings.affinity and request.conversation and request.priority == 0
        outcome, figure = await self._submit(
            keys=[keys.requests(model, request.priority), keys.live_workers(model), keys.load(model),
                  keys.affinity(model, request.conversation) if routed else "", keys.lanes(model),
                  keys.requests(model),
                  *(keys.finished(model, bucket - i) for i in range(1, FINISHED_WINDOW_BUCKETS + 1))],
            args=[now - LIVE_WINDOW_S, int(self.settings.require_live_worker),
                  self.settings.models[model].max_queue_depth, request.deadline - now, FINISHED_BUCKET_S,
                  keys.WORKER_GROUP, keys.worker_requests(model, ""), self.settings.batch.max_running,
                  request.model_dump_json(), request.priority, MAX_LANES],
        )  # fmt: skip
        if outcome == "refused_no_worker":
            raise APIError(
                503,
                f"No worker is serving model '{model}' right now.",
                code="no_live_worker",
                headers={"Retry-After": "5"},
            )
        if outcome == "refused_full":
            raise APIError(
                503,
                f"The queue for model '{model}' is full. Please try again later.",
                code="queue_full",
                headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)},
            )
        if outcome == "refused_lanes":
            raise APIError(
                400,
                f"The queue for model '{model}' keeps at most {MAX_LANES} priority values besides 0, all in use; "
                f"send one of them.",
                param="priority",
                code="unsupported_value",
            )
        if outcome == "refused_late":
            wait_s = float(figure)
            raise APIError(
                503,
                f"The queue for model '{model}' would not reach this request before its deadline "
                f"(about {wait_s:.0f} s of work is waiting). Please try again later.",
                code="deadline_unreachable",
                headers={"Retry-After": str(math.ceil(wait_s - (request.deadline - now)))},
            )
        if routed:
            metrics.AFFINITY_ROUTES.labels(model, outcome).inc()

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
        return (await self.results([request_id]))[0]

    async def results(self, request_ids: list[str]) -> list[FinalResult | None]:
        """The final records of requests, in one round trip (None for those not ended)."""
        bodies = await self.redis.mget([keys.result(request_id) for request_id in request_ids])
        return [None if body is None else FinalResult.model_validate_json(body) for body in bodies]

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
