"""The worker's loop: take requests from the model's streams, step the scheduler, write results back.

One Redis round trip per step carries everything: the step's token deltas and final records, the acks, the
cancellation checks, the heartbeat (with the refresh of the entries this worker holds and the reclaim of dead
workers' entries) and the read of new work (which blocks only while the worker is idle).

Streams read, in priority order: the model's shared stream (its lanes, most urgent first: worker.lanes), this
worker's own stream just before the 0 lane (conversation turns whose prefix it holds in cache, see
worker.own_stream), and batch lines only in slots that interactive traffic leaves.

Redis going away is waited out with backoff; SIGTERM drains: no new work, what is running finishes within
`delivery.drain_grace_s`, the rest is handed back for other workers to resume, then the worker deregisters."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import redis
import structlog
from opentelemetry.trace import Tracer
from pydantic import ValidationError

from shared import keys, tracing
from shared.protocol import (
    FINISHED_BUCKET_S,
    FINISHED_WINDOW_BUCKETS,
    HEARTBEAT_INTERVAL_S,
    AdapterSource,
    FinalResult,
    InferenceRequest,
    TokenDelta,
)
from shared.settings import Settings
from worker import lanes, own_stream
from worker.reclaim import OWN_OR_REPORT_LOST, resume_point
from worker.scheduler import Scheduler, StepEvent

log = structlog.get_logger(__name__)

ADOPT_INTERVAL_S = 5.0
IDLE_BLOCK_MS = 500
STOP_RETRY_LIMIT_S = 2.0
MAX_BACKOFF_S = 5.0


def ensure_group(client: redis.Redis, stream: str) -> None:
    try:
        # Id 0, not $: requests queued before the first worker came up are served too.
        client.xgroup_create(stream, keys.WORKER_GROUP, id="0", mkstream=True)
    except redis.ResponseError as error:
        if "BUSYGROUP" not in str(error):
            raise


@dataclass
class Held:
    """A request this worker runs: its stream entry, acknowledged only once its final record is written."""

    stream: str
    entry_id: str
    streams: bool
    request: InferenceRequest | None = None


@dataclass
class Replies:
    watched: list[str] = field(default_factory=list)
    cancel: list = field(default_factory=list)
    lost: bool = False
    owned: set[str] = field(default_factory=set)
    claimed: dict[str, list] = field(default_factory=dict)
    new: list = field(default_factory=list)
    adapters: set[str] | None = None
    """The revisions of the runtime LoRA adapters still loaded (keys.lora_adapters), when the heartbeat read them."""


class WorkerService:
    def __init__(
        self, settings: Settings, model: str, scheduler: Scheduler, client: redis.Redis, worker_id: str,
        tracer: Tracer | None = None,
    ):  # fmt: skip
        self.settings = settings
        self.tracer = tracer
        self.model = model
        self.stream = keys.requests(model)
        self.lanes = [self.stream]
        """The model's lanes, most urgent first, as the last READ found them."""
        self.batch_stream = keys.batch_requests(model)
        self.own = keys.worker_requests(model, worker_id)
        self.scheduler = scheduler
        self.redis = client
        self.worker_id = worker_id
        self._held: dict[str, Held] = {}  # request id -> its entry
        # Batch entries read in the same round trip as interactive ones wait here (in this worker's pending
        # list) until a slot beyond the interactive reserve is free; they never queue ahead of interactive work.
        self._batch_backlog: deque[tuple[str, dict]] = deque()
        self._last_heartbeat = 0.0
        self._last_adoption = 0.0
        self._stop = threading.Event()
        # Called in the step's pipeline by sha (evalsha): a registered Script there costs a round trip more
        # (SCRIPT EXISTS) every time. Loaded at start, and again should Redis come back without them.
        self._scripts = {name: client.register_script(body) for name, body in [
            ("own_or_report_lost", OWN_OR_REPORT_LOST), ("read_lanes", lanes.READ),
        ]}  # fmt: skip
        self._found_nothing = False
        """The last read found nothing in any stream in order (worker.lanes.READ): the next idle one blocks."""
        self.serving = False
        """True from the first read of the streams until the drain ends (worker.http_server's /ready)."""

    @property
    def draining(self) -> bool:
        return self._stop.is_set()

    @property
    def last_progress(self) -> float:
        """When the loop last came round a heartbeat: at least every HEARTBEAT_INTERVAL_S while alive."""
        return self._last_heartbeat

    def state(self) -> dict:
        return {
            "worker": self.worker_id,
            "model": self.model,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "free_slots": self.scheduler.free_capacity,
            "draining": self.draining,
        }

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        self._with_retry(self._set_up_redis)
        self.serving = True
        log.info("worker.serving", model=self.model, worker=self.worker_id)
        drain_until = None
        while True:
            if stop.is_set():
                if drain_until is None:
                    drain_until = time.time() + self.settings.delivery.drain_grace_s
                    self._with_retry(self._leave_fleet)
                    log.info("worker.draining", running=len(self.scheduler.running), grace_s=drain_until - time.time())
                if not self.scheduler.has_work and not self._batch_backlog:
                    break
                if time.time() >= drain_until:
                    self._hand_back()
                    break
            events = self.scheduler.step() if self.scheduler.has_work else []
            self._exchange(events, accept_new=not stop.is_set())
            if not stop.is_set() and time.time() - self._last_adoption > ADOPT_INTERVAL_S:
                self._with_retry(lambda: own_stream.adopt_orphans(self.redis, self.model))
                self._last_adoption = time.time()
        # Anything still in the own stream (handed back above, or arrived since) goes to the shared one.
        self._with_retry(lambda: own_stream.move_to_shared(self.redis, self.model, self.worker_id))
        self._with_retry(lambda: self.redis.delete(self.own))
        self.serving = False
        log.info("worker.stopped", worker=self.worker_id)

    def _set_up_redis(self) -> None:
        """The groups of the streams this worker reads, and its scripts."""
        for stream in (*self.lanes, self.own, self.batch_stream):
            ensure_group(self.redis, stream)
        for script in self._scripts.values():
            self.redis.script_load(script.script)

    def _script(self, pipe, name: str, keys: list[str], args: list) -> None:
        pipe.evalsha(self._scripts[name].sha, len(keys), *keys, *args)

    def _leave_fleet(self) -> None:
        """Stop being routed to, and give what waits unread in the own stream back to the shared one."""
        self.redis.zrem(keys.live_workers(self.model), self.worker_id)
        self.redis.hdel(keys.load(self.model), self.worker_id)
        still_mine = frozenset(h.entry_id for h in self._held.values() if h.stream == self.own)
        moved = own_stream.move_to_shared(self.redis, self.model, self.worker_id, keep=still_mine)
        log.info("worker.leaving", handed_back=moved, finishing=len(self._held))

    # -- Redis, with backoff ---------------------------------------------------------------------------------
    def _with_retry(self, call):
        backoff = 0.1
        while True:
            try:
                return call()
            except (redis.ConnectionError, redis.TimeoutError) as error:
                if self._stop.is_set() and backoff >= STOP_RETRY_LIMIT_S:
                    # What is not acknowledged stays pending in the group, for another worker to reclaim.
                    log.error("worker.stopped_without_redis", error=str(error))
                    raise SystemExit(1) from None
                log.warning("worker.redis_unavailable", error=str(error), retry_in_s=backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            except redis.ResponseError as error:
                lost = isinstance(error, redis.exceptions.NoScriptError)
                if not lost and "NOGROUP" not in str(error) and "UNBLOCKED" not in str(error):
                    raise
                # Redis came back without our data (no AOF, or a fresh instance), or a stream was deleted under
                # the blocked read: recreate the groups (and the scripts).
                log.warning("worker.group_missing", error=str(error))
                self._set_up_redis()

    # -- one exchange per step -------------------------------------------------------------------------------
    def _exchange(self, events: list[StepEvent], accept_new: bool) -> None:
        finished = {e.request_id for e in events if e.final is not None}
        heartbeat = time.time() - self._last_heartbeat >= HEARTBEAT_INTERVAL_S
        # Built again on every attempt (a failed pipeline is reset) and state changes only once it went through.
        for event in events:
            if event.final is not None:
                self._ended(event.final, self._held.get(event.request_id))
        replies = self._with_retry(lambda: self._round_trip(events, finished, heartbeat, accept_new))
        for request_id in finished:
            self._held.pop(request_id, None)
        if heartbeat:
            self._last_heartbeat = time.time()
        if replies.adapters is not None:
            self.scheduler.adapters.keep(replies.adapters)
        for request_id, flag in zip(replies.watched, replies.cancel):
            if flag is not None:
                self.scheduler.cancel(request_id)
        if replies.lost:
            self._release_lost(replies.owned, finished)
        fresh, taken_over = [], {}
        for stream, entries in replies.new:
            if stream == self.batch_stream:
                self._batch_backlog.extend(entries)
                continue
            for entry_id, fields in entries:
                # Entries another worker handed back may have streamed part of their answer: resume those.
                if own_stream.HANDED_BACK in fields:
                    taken_over.setdefault(stream, []).append((entry_id, fields))
                else:
                    fresh.append((stream, entry_id, fields))
        for stream, entries in replies.claimed.items():
            taken_over.setdefault(stream, []).extend(entries)
        accepted = [self._accept(*entry) for entry in fresh]
        for stream, entries in taken_over.items():
            accepted += self._take_over(stream, entries)
        accepted = [r for r in accepted if r is not None]
        reserve = self.settings.jobs.interactive_reserve if accept_new else 0
        spare = self.scheduler.free_capacity - len(accepted) - reserve
        while self._batch_backlog and spare > 0:
            request = self._accept(self.batch_stream, *self._batch_backlog.popleft())
            if request is not None:
                accepted.append(request)
                spare -= 1
        if accepted:
            # A request cancelled while it waited in the stream must never start.
            flags = self._with_retry(lambda: self.redis.mget([keys.cancel(r.id) for r in accepted]))
            for request, flag in zip(accepted, flags):
                self.scheduler.add(request)
                if flag is not None:
                    self.scheduler.cancel(request.id)

    def _round_trip(self, events: list[StepEvent], finished: set[str], heartbeat: bool, accept_new: bool) -> Replies:
        pipe = self.redis.pipeline(transaction=False)
        for event in events:
            held = self._held.get(event.request_id)
            if held is not None and held.streams and (event.delta or event.logprobs or event.final is None):
                self._write_delta(pipe, event)
            if event.final is not None:
                self._write_final(pipe, event.final, held)
        slots: dict[str, int] = {}

        def add(name: str, command) -> None:
            slots[name] = len(pipe.command_stack)
            command()

        watched = self.scheduler.request_ids()
        if watched:
            add("cancel", lambda: pipe.mget([keys.cancel(i) for i in watched]))
        capacity = self.scheduler.free_capacity if accept_new else 0
        held_streams: dict[str, list[str]] = {}
        if heartbeat:
            if not self._stop.is_set():  # a draining worker is alive but no longer offered work
                pipe.zadd(keys.live_workers(self.model), {self.worker_id: time.time()})
                load = len(self.scheduler.running) + len(self.scheduler.waiting)
                pipe.hset(keys.load(self.model), self.worker_id, load)
            for rid, h in self._held.items():
                if rid not in finished:
                    held_streams.setdefault(h.stream, []).append(h.entry_id)
            for stream, entry_ids in held_streams.items():
                add(f"owned:{stream}", lambda s=stream, ids=entry_ids: self._script(
                    pipe, "own_or_report_lost", [s], [keys.WORKER_GROUP, self.worker_id, *ids]
                ))  # fmt: skip
            if self.scheduler.adapters.loaded:  # to drop the runtime adapters unloaded since
                add("adapters", lambda: pipe.hgetall(keys.lora_adapters()))
            if capacity > 0:
                idle_ms = int(self.settings.delivery.reclaim_idle_s * 1000)
                for stream in (*self.lanes, self.batch_stream):
                    add(f"claimed:{stream}", lambda s=stream: pipe.xautoclaim(
                        s, keys.WORKER_GROUP, self.worker_id, idle_ms, start_id="0-0", count=capacity
                    ))  # fmt: skip

        def read_in_order(*args) -> None:  # worker.lanes.READ: how many, and the priority to beat if any
            add("lanes", lambda: self._script(
                pipe, "read_lanes", [self.own, self.stream, keys.lanes(self.model)],
                [keys.WORKER_GROUP, self.worker_id, *args],
            ))  # fmt: skip

        if capacity > 0:
            batch = {} if self._batch_backlog or capacity <= self.settings.jobs.interactive_reserve else {
                self.batch_stream: ">"
            }  # fmt: skip
            # Idle, and the last read in order found nothing: block on every stream until something comes.
            blocking = self._found_nothing and not self.scheduler.has_work and not self._batch_backlog
            if blocking:
                streams = {self.own: ">", **dict.fromkeys(self.lanes, ">"), **batch}
                add("new", lambda: pipe.xreadgroup(
                    keys.WORKER_GROUP, self.worker_id, streams, count=capacity, block=IDLE_BLOCK_MS
                ))  # fmt: skip
            else:
                read_in_order(capacity)
                if batch:
                    add("new", lambda: pipe.xreadgroup(keys.WORKER_GROUP, self.worker_id, batch, count=capacity))
        elif (bound := self._preemption_bound(accept_new)) is not None:
            read_in_order(1, bound)
        elif not self.scheduler.has_work and not self._batch_backlog:
            time.sleep(IDLE_BLOCK_MS / 1000)
        replies = pipe.execute()
        result = Replies(watched=watched)
        if "cancel" in slots:
            result.cancel = replies[slots["cancel"]]
        for stream in held_streams:
            result.lost = True
            result.owned.update(replies[slots[f"owned:{stream}"]])
        for stream in (*self.lanes, self.batch_stream):
            if f"claimed:{stream}" in slots:
                result.claimed[stream] = replies[slots[f"claimed:{stream}"]][1]
        if "lanes" in slots:
            self.lanes, read = replies[slots["lanes"]]
            result.new = lanes.entries_by_stream(read)
        if "new" in slots:
            result.new += replies[slots["new"]] or []
        if capacity > 0:
            self._found_nothing = "lanes" in slots and not result.new
        if "adapters" in slots:
            loaded = replies[slots["adapters"]].values()
            result.adapters = {AdapterSource.model_validate_json(entry).revision for entry in loaded}
        return result

    def _preemption_bound(self, accept_new: bool) -> int | None:
        """Full, under scheduling_policy "priority": the priority a queued request must be more urgent than to be
        read now and take a running sequence's slot; None where none is looked for."""
        if not accept_new or self.settings.scheduling_policy != "priority":
            return None
        return self.scheduler.preemptible_priority()

    def _write_delta(self, pipe, event: StepEvent) -> None:
        out = keys.output(event.request_id)
        delta = TokenDelta(
            text=event.delta,
            completion_tokens=event.completion_tokens,
            token_ids=event.token_ids,
            logprobs=event.logprobs,
            prompt_logprobs=event.prompt_logprobs,
        )
        pipe.xadd(out, {"d": delta.model_dump_json()})
        pipe.expire(out, self.settings.token_stream_ttl_s)

    def _write_final(self, pipe, final: FinalResult, held: Held | None) -> None:
        body = final.model_dump_json()
        out = keys.output(final.id)
        pipe.xadd(out, {"f": body})
        pipe.expire(out, self.settings.token_stream_ttl_s)
        self._record_result(pipe, final.id, body, held)
        finished = keys.finished(self.model, int(time.time() // FINISHED_BUCKET_S))
        pipe.incr(finished)
        pipe.expire(finished, FINISHED_BUCKET_S * (FINISHED_WINDOW_BUCKETS + 2))
        if final.conversation and self.settings.affinity:
            pipe.set(keys.affinity(self.model, final.conversation), self.worker_id, ex=self.settings.affinity_ttl_s)

    def _ended(self, final: FinalResult, held: Held | None) -> None:
        """A request ended here: counted, logged and traced once, before its final record is written (whatever
        retries that takes), so that no reader of the record finds it not yet counted."""
        self.scheduler.metrics.final(final)
        request = held.request if held is not None else None
        if self.tracer is not None and request is not None and request.trace_headers:
            tracing.request_span(self.tracer, request, final)
        log.info(
            "request.finished",
            request_id=final.id,
            finish_reason=final.finish_reason,
            prompt_tokens=final.prompt_tokens,
            cached_tokens=final.cached_tokens,
            completion_tokens=final.completion_tokens,
            queued_s=round(final.timings.queued_s, 4),
            ttft_s=None if final.timings.ttft_s is None else round(final.timings.ttft_s, 4),
            total_s=round(final.timings.total_s, 4),
        )

    def _end_now(self, final: FinalResult, held: Held, *extra) -> None:
        """Write a final record (and whatever else goes with it) for a request that never reaches the batch."""

        def write() -> None:
            pipe = self.redis.pipeline(transaction=False)
            for command in extra:
                command(pipe)
            self._write_final(pipe, final, held)
            pipe.execute()

        self._ended(final, held)
        self._with_retry(write)
        self._held.pop(final.id, None)

    # -- intake ----------------------------------------------------------------------------------------------
    def _parse(self, stream: str, entry_id: str, fields: dict | None) -> InferenceRequest | None:
        try:
            return InferenceRequest.model_validate_json((fields or {}).get("r", ""))
        except ValidationError as error:
            # Unreadable entry: nobody can be told, so only drop it from the group.
            log.error("request.unreadable", entry_id=entry_id, error=str(error))
            self._with_retry(lambda: self.redis.xack(stream, keys.WORKER_GROUP, entry_id))
            return None

    def _accept(self, stream: str, entry_id: str, fields: dict | None) -> InferenceRequest | None:
        """The request in a stream entry, or None when it can only be answered (or dropped) at once."""
        request = self._parse(stream, entry_id, fields)
        if request is None:
            return None
        held = self._held[request.id] = Held(stream, entry_id, request.stream, request)
        needed = len(request.prompt_token_ids) + request.sampling.max_tokens
        capacity = self.scheduler.runner.capacity
        if needed > capacity:
            message = f"prompt plus max_tokens ({needed}) exceeds this worker's context ({capacity})"
            self._end_now(self._failed(request, message), held)
            return None
        prompt_tokens = len(request.prompt_token_ids)
        log.info("request.started", request_id=request.id, prompt_tokens=prompt_tokens, priority=request.priority)
        return request

    def _failed(self, request: InferenceRequest, reason: str) -> FinalResult:
        return FinalResult(
            id=request.id,
            model=self.model,
            finish_reason="error",
            error=reason,
            prompt_tokens=len(request.prompt_token_ids),
            worker=self.worker_id,
            conversation=request.conversation,
        )

    def _take_over(self, stream: str, entries: list) -> list[InferenceRequest | None]:
        """Requests that another worker started (reclaimed from a dead one, or handed back): dead-letter the
        poison ones, acknowledge the finished ones, resume the others from the tokens already streamed."""
        parsed = [(entry_id, fields, self._parse(stream, entry_id, fields)) for entry_id, fields in entries]
        parsed = [(entry_id, fields, r) for entry_id, fields, r in parsed if r is not None]
        if not parsed:
            return []

        def look() -> list:
            pipe = self.redis.pipeline(transaction=False)
            for entry_id, _, request in parsed:
                pipe.xpending_range(stream, keys.WORKER_GROUP, min=entry_id, max=entry_id, count=1)
                pipe.xrange(keys.output(request.id))
            return pipe.execute()

        replies = self._with_retry(look)
        taken = []
        for i, (entry_id, fields, request) in enumerate(parsed):
            pending, output = replies[2 * i], replies[2 * i + 1]
            deliveries = pending[0]["times_delivered"] if pending else 1
            deliveries += int(fields.get(own_stream.HANDED_BACK, 0))
            point = resume_point(output)
            log.info("request.reclaimed", request_id=request.id, deliveries=deliveries, resumed=len(point.token_ids))
            if request.id in self._held:  # ours all along: we stalled past the idle timeout
                continue
            if point.final is not None:
                self._with_retry(lambda e=entry_id, r=request.id, f=point.final: self._complete(stream, e, r, f))
                continue
            if deliveries > self.settings.delivery.max_deliveries:
                self._dead_letter(stream, entry_id, fields, request, deliveries)
                continue
            resumed = request.model_copy(update={"resume_token_ids": point.token_ids})
            taken.append(self._accept(stream, entry_id, {"r": resumed.model_dump_json()}))
        return taken

    def _complete(self, stream: str, entry_id: str, request_id: str, final: str) -> None:
        """Acknowledge a request whose final record reached its output stream. The worker that wrote it may have
        died before the rest of that pipeline (the result record, the acknowledgement) reached Redis: the result
        record is written again (NX: one that is there stands)."""
        pipe = self.redis.pipeline(transaction=False)
        self._record_result(pipe, request_id, final, Held(stream, entry_id, streams=False))
        pipe.execute()

    def _record_result(self, pipe, request_id: str, body: str, held: Held | None) -> None:
        """The result record, then the acknowledgement of the request's entry (if this worker holds one)."""
        # NX: should two workers ever finish the same request, the first result stands.
        pipe.set(keys.result(request_id), body, nx=True, ex=self.settings.result_ttl_s)
        if held is not None:
            pipe.xack(held.stream, keys.WORKER_GROUP, held.entry_id)
            pipe.xdel(held.stream, held.entry_id)

    def _dead_letter(self, stream: str, entry_id: str, fields: dict, request: InferenceRequest, deliveries: int):
        reason = (
            f"delivered {deliveries} times without finishing (its workers died); "
            f"moved to the dead-letter stream {keys.dead_letters(self.model)}"
        )
        log.error("request.dead_lettered", request_id=request.id, deliveries=deliveries)
        record = {"r": fields["r"], "entry_id": entry_id, "reason": reason, "deliveries": deliveries}
        self._end_now(
            self._failed(request, reason),
            Held(stream, entry_id, request.stream, request),
            lambda pipe: pipe.xadd(keys.dead_letters(self.model), record),
        )

    def _release_lost(self, owned: set[str], finished: set[str]) -> None:
        for request_id, held in list(self._held.items()):
            if request_id not in finished and held.entry_id not in owned:
                log.warning("request.lost_to_another_worker", request_id=request_id)
                self.scheduler.release(request_id)
                del self._held[request_id]

    def _hand_back(self) -> None:
        """Drain time is up: make what is still running claimable by other workers at once, resuming from the
        tokens already streamed (IDLE set past the reclaim timeout; JUSTID: not counted as a delivery). Entries
        of the own stream go back to the shared stream when the loop ends (run)."""
        by_stream: dict[str, list[str]] = {}
        for held in self._held.values():
            by_stream.setdefault(held.stream, []).append(held.entry_id)
        log.warning("worker.handing_back", requests=len(self._held))
        idle_ms = int(self.settings.delivery.reclaim_idle_s * 1000) + 1
        for stream, entry_ids in by_stream.items():
            if stream != self.own:
                self._with_retry(lambda s=stream, ids=entry_ids: self.redis.xclaim(
                    s, keys.WORKER_GROUP, self.worker_id, 0, ids, idle=idle_ms, justid=True
                ))  # fmt: skip
        for request_id in list(self._held):
            self.scheduler.release(request_id)
        self._held.clear()
