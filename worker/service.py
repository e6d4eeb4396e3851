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
from shared.protocol import HEARTBEAT_INTERVAL_S, FinalResult, InferenceRequest, TokenDelta
from shared.settings import Settings
from worker import own_stream
from worker.scheduler import Scheduler, StepEvent

log = structlog.get_logger(__name__)

ADOPT_INTERVAL_S = 5.0
IDLE_BLOCK_MS = 500
STOP_RETRY_LIMIT_S = 2.0


def ensure_group(client: redis.Redis, stream: str) -> None:
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
        self._entries: dict[str, tuple[str, str, bool]] = {}  # request id -> (stream, entry id, streams deltas)
        self._own = keys.worker_requests(model, worker_id)
        self._last_heartbeat = 0.0
        self._last_adoption = 0.0
        self._watched: list[str] = []  # request ids whose cancel flags the current round trip reads
        self._stop = threading.Event()
        self.serving = False
        """True from the first read of the stream until the drain ends (worker.http_server's /ready)."""

    @property
    def draining(self) -> bool:
        return self._stop.is_set()

    @property
    def last_progress(self) -> float:
        """When the loop last wrote its heartbeat: it does so at least every HEARTBEAT_INTERVAL_S while alive."""
        return self._last_heartbeat
        # Batch entries read in the same round trip as interactive ones wait here (in this worker's pending
        # list) until a slot beyond the interactive reserve is free; they never queue ahead of interactive work.
        self._batch_backlog: deque[tuple[str, dict]] = deque()

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        for stream in (keys.requests(self.model), self._own, keys.batch_requests(self.model)):
            ensure_group(self.redis, stream)
        self.serving = True
        log.info("worker.serving", model=self.model, worker=self.worker_id)
        handed_back = False
        while not (stop.is_set() and not self.scheduler.has_work and not self._batch_backlog):
            if stop.is_set() and not handed_back:
                self._leave_fleet()
                handed_back = True
            events = self.scheduler.step() if self.scheduler.has_work else []
            self._exchange(events, accept_new=not stop.is_set())
            if time.time() - self._last_adoption > ADOPT_INTERVAL_S and not stop.is_set():
                own_stream.adopt_orphans(self.redis, self.model)
                self._last_adoption = time.time()
        if not handed_back:
            self._leave_fleet()
        self.redis.delete(self._own)
        self.serving = False
        log.info("worker.stopped", worker=self.worker_id)

    def _leave_fleet(self) -> None:
        """Stop being routed to, and give what waits in the own stream back to the shared one."""
        self.redis.zrem(keys.live_workers(self.model), self.worker_id)
        self.redis.hdel(keys.load(self.model), self.worker_id)
        still_mine = frozenset(entry_id for stream, entry_id, _ in self._entries.values() if stream == self._own)
        moved = own_stream.move_to_shared(self.redis, self.model, self.worker_id, keep=still_mine)
        log.info("worker.leaving", handed_back=moved, finishing=len(self._entries))

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
        batch_stream = keys.batch_requests(self.model)
        arrived = []
        for stream, entries in replies["new"] or []:
            if stream == batch_stream:
                self._batch_backlog.extend(entries)
            else:
                arrived.extend((stream, entry_id, fields) for entry_id, fields in entries)
        accepted = [r for r in (self._accept(*entry) for entry in arrived) if r is not None]
        reserve = self.settings.jobs.interactive_reserve if accept_new else 0
        spare = self.scheduler.free_capacity - len(accepted) - reserve
        while self._batch_backlog and spare > 0:
            request = self._accept(batch_stream, *self._batch_backlog.popleft())
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
            _, _, streams = self._entries.get(event.request_id, (None, None, False))
            out = keys.output(event.request_id)
            if streams and (event.delta or event.final is None):
                pipe.xadd(
                    out,
                    {"d": TokenDelta(text=event.delta, completion_tokens=event.completion_tokens).model_dump_json()},
                )
                if event.completion_tokens <= 1:
                    pipe.expire(out, settings.token_stream_ttl_s)
            if event.final is not None:
                self._write_final(pipe, event.final)
        self._watched = self.scheduler.request_ids()
        n_before = len(pipe.command_stack)
        if self._watched:
            pipe.mget([keys.cancel(i) for i in self._watched])
        now = time.time()
        if now - self._last_heartbeat >= HEARTBEAT_INTERVAL_S:
            if not self._stop.is_set():  # a draining worker is alive but no longer offered work
                pipe.zadd(keys.live_workers(self.model), {self.worker_id: now})
                load = len(self.scheduler.running) + len(self.scheduler.waiting)
                pipe.hset(keys.load(self.model), self.worker_id, load)
            self._last_heartbeat = now
        capacity = self.scheduler.free_capacity if accept_new else 0
        if capacity > 0:
            block = None if self.scheduler.has_work or self._batch_backlog else IDLE_BLOCK_MS
            # Own stream first (turns whose prefix this worker holds in cache), then the shared one; batch lines
            # only when interactive traffic leaves slots beyond the reserve.
            streams = {self._own: ">", keys.requests(self.model): ">"}
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

    def _write_final(self, pipe, final: FinalResult) -> None:
        body = final.model_dump_json()
        out = keys.output(final.id)
        pipe.xadd(out, {"f": body})
        pipe.expire(out, self.settings.token_stream_ttl_s)
        # NX: should two workers ever finish the same request, the first result stands.
        pipe.set(keys.result(final.id), body, nx=True, ex=self.settings.result_ttl_s)
        stream, entry_id, _ = self._entries.pop(final.id, (None, None, False))
        if entry_id is not None:
            pipe.xack(stream, keys.WORKER_GROUP, entry_id)
            pipe.xdel(stream, entry_id)
        self.scheduler.metrics.final(final)
        if final.conversation and self.settings.affinity:
            pipe.set(keys.affinity(self.model, final.conversation), self.worker_id, ex=self.settings.affinity_ttl_s)
        log.info(
            "request.finished",
            request_id=final.id,
            finish_reason=final.finish_reason,
            prompt_tokens=final.prompt_tokens,
            completion_tokens=final.completion_tokens,
            total_s=round(final.timings.total_s, 4),
        )

    def _accept(self, stream: str, entry_id: str, fields: dict) -> InferenceRequest | None:
        """The request in a stream entry, or None when it can only be answered (or dropped) at once."""
        try:
            request = InferenceRequest.model_validate_json(fields.get("r", ""))
        except ValidationError as error:
            # Unreadable entry: nobody can be told, so only drop it from the group.
            log.error("request.unreadable", entry_id=entry_id, error=str(error))
            self.redis.xack(stream, keys.WORKER_GROUP, entry_id)
            return None
        self._entries[request.id] = (stream, entry_id, request.stream)
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
            self._write_final(pipe, final)
            pipe.execute()
            return None
        log.info("request.started", request_id=request.id, prompt_tokens=len(request.prompt_token_ids))
        return request
