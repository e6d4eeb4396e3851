"""The gateway's side of the Redis protocol (shared.keys): submit a request, follow its output, cancel it.

Nothing here is held in gateway memory between calls, so any gateway replica can follow any request."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from gateway.errors import APIError
from shared import keys
from shared.protocol import FinalResult, InferenceRequest, TokenDelta
from shared.settings import Settings

LIVE_WINDOW_S = 5.0
"""A worker whose last heartbeat is older than this is not counted as live."""
FOLLOW_BLOCK_MS = 1000
CANCEL_TTL_S = 3600
GRACE_AFTER_DEADLINE_S = 5.0
QUEUE_FULL_RETRY_AFTER_S = 10


class QueueClient:
    def __init__(self, client: aioredis.Redis, settings: Settings):
        self.redis = client
        self.settings = settings

    async def live_workers(self, model: str) -> int:
        return await self.redis.zcount(keys.live_workers(model), time.time() - LIVE_WINDOW_S, "+inf")

    async def submit(self, request: InferenceRequest) -> None:
        """Queue `request`, unless no worker serves its model (503) or its queue is at its bound (503)."""
        stream = keys.requests(request.model)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcount(keys.live_workers(request.model), time.time() - LIVE_WINDOW_S, "+inf")
            # Workers XDEL what they finish, so the length is what is queued or running.
            pipe.xlen(stream)
            live, depth = await pipe.execute()
        if not live:
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
        await self.redis.xadd(stream, {"r": request.model_dump_json()})

    async def follow(self, request: InferenceRequest) -> AsyncIterator[TokenDelta | FinalResult]:
        """Token deltas as the worker writes them, then the final record (always last)."""
        out = keys.output(request.id)
        last = "0-0"
        while True:
            reply = await self.redis.xread({out: last}, block=FOLLOW_BLOCK_MS, count=256)
            if not reply:
                if time.time() > request.deadline + GRACE_AFTER_DEADLINE_S:
                    yield await self._expired(request)
                    return
                continue
            for entry_id, fields in reply[0][1]:
                last = entry_id
                if "f" in fields:
                    yield FinalResult.model_validate_json(fields["f"])
                    return
                yield TokenDelta.model_validate_json(fields["d"])

    async def result(self, request_id: str) -> FinalResult | None:
        body = await self.redis.get(keys.result(request_id))
        return None if body is None else FinalResult.model_validate_json(body)

    async def cancel(self, request_id: str) -> None:
        await self.redis.set(keys.cancel(request_id), "1", ex=CANCEL_TTL_S)

    async def _expired(self, request: InferenceRequest) -> FinalResult:
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
