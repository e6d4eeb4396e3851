"""The worker's loop: take requests from the model's stream, step the scheduler, write results back.

One Redis round trip per step carries everything: the step's token deltas and final records, the acks, the
cancellation checks, the heartbeat and the read of new work (which blocks only while the worker is idle)."""

from __future__ import annotations

import threading
import time
from collections import deque

import redis
import structlog
from pydantic import ValidationError

from shared import keys
from shared.protocol import FinalResult, InferenceRequest, TokenDelta
from shared.settings import Settings
from worker.scheduler import Scheduler, StepEvent

log = structlog.get_logger(__name__)

HEARTBEAT_INTERVAL_S = 1.0
IDLE_BLOCK_MS = 500
STOP_RETRY_LIMIT_S = 2.0


def ensure_group(client: redis.Redis, model: str) -> None:
    for stream in (keys.requests(model), keys.batch_requests(model)):
        try:
            # Id 0, not $: requests queued before the first worker came up are served too.
            client.xgroup_create(stream, keys.WORKER_GROUP, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise


class WorkerService:
    def __init__(self, settings: Settings, model: str, scheduler: Scheduler, client: redis.Redis, worker_id: str):
        self.settings = settings
        self.model = model
        self.scheduler = scheduler
        self.redis = client
        self.worker_id = worker_id
        self._entries: dict[str, tuple[str, bool]] = {}  # request id -> (stream entry id, streams deltas)
        self._last_heartbeat = 0.0
        self._watched: list[str] = []  # request ids whose cancel flags the current round trip reads
        self._stop = threading.Event()
        # Batch entries read in the same round trip as interactive ones wait here (in this worker's pending
        # list) until a slot beyond the interactive reserve is free; they never queue ahead of interactive work.
        self._batch_backlog: deque[tuple[str, dict]] = deque()
        self._from_batch: set[str] = set()

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        ensure_group(self.redis, self.model)
        log.info("worker.serving", model=self.model, worker=self.worker_id)
        while not (stop.is_set() and not self.scheduler.has_work and not self._batch_backlog):
            events = self.scheduler.step() if self.scheduler.has_work else []
            self._exchange(events, accept_new=not stop.is_set())
        self.redis.zrem(keys.live_workers(self.model), self.worker_id)
        log.info("worker.stopped", worker=self.worker_id)

    def _exchange(self, events: list[StepEvent], accept_new: bool) -> None:
        backoff = 0.1
        while True:
            try:
                replies = self._round_trip(events, accept_new)
                break
            except (redis.ConnectionError, redis.TimeoutError) as error:
                if self._stop.is_set() and backoff >= STOP_RETRY_LIMIT_S:
                    raise SystemExit(
                        "stopping, and Redis is unreachable: what is unacknowledged stays pending"
                    ) from None
                log.warning("worker.redis_unavailable", error=str(error), retry_in_s=backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        for request_id, flag in zip(self._watched, replies["cancel"] or []):
            if flag is not None:
                self.scheduler.cancel(request_id)
        arrived = []
        for stream, entries in replies["new"] or []:
            if stream == keys.batch_requests(self.model):
                self._batch_backlog.extend(entries)
            else:
                arrived.extend(entries)
        accepted = [r for r in (self._accept(entry_id, fields) for entry_id, fields in arrived) if r is not None]
        reserve = self.settings.jobs.interactive_reserve if accept_new else 0
        spare = self.scheduler.free_capacity - len(accepted) - reserve
        while self._batch_backlog and spare > 0:
            request = self._accept(*self._batch_backlog.popleft(), from_batch=True)
            if request is not None:
                accepted.append(request)
                spare -= 1
        if accepted:
            # A request cancelled while it waited in the stream must never start.
            flags = self.redis.mget([keys.cancel(r.id) for r in accepted])
            for request, flag in zip(accepted, flags):
                self.scheduler.add(request)
                if flag is not None:
                    self.scheduler.cancel(request.id)

    def _round_trip(self, events: list[StepEvent], accept_new: bool) -> dict:
        pipe = self.redis.pipeline(transaction=False)
        settings = self.settings
        for event in events:
            entry_id, streams = self._entries.get(event.request_id, (None, False))
            out = keys.output(event.request_id)
            if streams and (event.delta or event.final is None):
                pipe.xadd(
                    out,
                    {"d": TokenDelta(text=event.delta, completion_tokens=event.completion_tokens).model_dump_json()},
                )
                if event.completion_tokens <= 1:
                    pipe.expire(out, settings.token_stream_ttl_s)
            if event.final is not None:
                self._write_final(pipe, event.final, entry_id)
        self._watched = self.scheduler.request_ids()
        n_before = len(pipe.command_stack)
        if self._watched:
            pipe.mget([keys.cancel(i) for i in self._watched])
        now = time.time()
        if now - self._last_heartbeat >= HEARTBEAT_INTERVAL_S:
            pipe.zadd(keys.live_workers(self.model), {self.worker_id: now})
            self._last_heartbeat = now
        capacity = self.scheduler.free_capacity if accept_new else 0
        if capacity > 0:
            block = None if self.scheduler.has_work or self._batch_backlog else IDLE_BLOCK_MS
            streams = {keys.requests(self.model): ">"}
            if not self._batch_backlog and capacity > settings.jobs.interactive_reserve:
                streams[keys.batch_requests(self.model)] = ">"
            pipe.xreadgroup(keys.WORKER_GROUP, self.worker_id, streams, count=capacity, block=block)
        elif not self.scheduler.has_work and not self._batch_backlog:
            time.sleep(IDLE_BLOCK_MS / 1000)
        replies = pipe.execute()
        return {
            "cancel": replies[n_before] if self._watched else None,
            "new": replies[-1] if capacity > 0 else None,
        }

    def _write_final(self, pipe, final: FinalResult, entry_id: str | None) -> None:
        body = final.model_dump_json()
        out = keys.output(final.id)
        pipe.xadd(out, {"f": body})
        pipe.expire(out, self.settings.token_stream_ttl_s)
        # NX: should two workers ever finish the same request, the first result stands.
        pipe.set(keys.result(final.id), body, nx=True, ex=self.settings.result_ttl_s)
        if entry_id is not None:
            from_batch = final.id in self._from_batch
            self._from_batch.discard(final.id)
            stream = keys.batch_requests(self.model) if from_batch else keys.requests(self.model)
            pipe.xack(stream, keys.WORKER_GROUP, entry_id)
            pipe.xdel(stream, entry_id)
        self._entries.pop(final.id, None)
        log.info(
            "request.finished",
            request_id=final.id,
            finish_reason=final.finish_reason,
            prompt_tokens=final.prompt_tokens,
            completion_tokens=final.completion_tokens,
            total_s=round(final.timings.total_s, 4),
        )

    def _accept(self, entry_id: str, fields: dict, from_batch: bool = False) -> InferenceRequest | None:
        """The request in a stream entry, or None when it can only be answered (or dropped) at once."""
        try:
            request = InferenceRequest.model_validate_json(fields.get("r", ""))
        except ValidationError as error:
            # Unreadable entry: nobody can be told, so only drop it from the group.
            log.error("request.unreadable", entry_id=entry_id, error=str(error))
            stream = keys.batch_requests(self.model) if from_batch else keys.requests(self.model)
            self.redis.xack(stream, keys.WORKER_GROUP, entry_id)
            return None
        self._entries[request.id] = (entry_id, request.stream)
        if from_batch:
            self._from_batch.add(request.id)
        needed = len(request.prompt_token_ids) + request.sampling.max_tokens
        capacity = self.scheduler.runner.capacity
        if needed > capacity:
            final = FinalResult(
                id=request.id,
                model=self.model,
                finish_reason="error",
                error=f"prompt plus max_tokens ({needed}) exceeds this worker's context ({capacity})",
                prompt_tokens=len(request.prompt_token_ids),
                worker=self.worker_id,
            )
            pipe = self.redis.pipeline(transaction=False)
            self._write_final(pipe, final, entry_id)
            pipe.execute()
            return None
        log.info("request.started", request_id=request.id, prompt_tokens=len(request.prompt_token_ids))
        return request
