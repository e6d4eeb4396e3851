"""The worker's loop: take requests from the model's stream, step the scheduler, write results back.

One Redis round trip per step carries everything: the step's token deltas and final records, the acks, the
cancellation checks, the heartbeat (with the refresh of the entries this worker holds and the reclaim of dead
workers' entries) and the read of new work (which blocks only while the worker is idle).

Redis going away is waited out with backoff; SIGTERM drains: no new work, what is running finishes within
`delivery.drain_grace_s`, the rest is handed back for other workers to resume, then the worker deregisters."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import redis
import structlog
from pydantic import ValidationError

from shared import keys
from shared.protocol import FinalResult, InferenceRequest, TokenDelta
from shared.settings import Settings
from worker.reclaim import OWN_OR_REPORT_LOST, resume_point
from worker.scheduler import Scheduler, StepEvent

log = structlog.get_logger(__name__)

HEARTBEAT_INTERVAL_S = 1.0
IDLE_BLOCK_MS = 500
STOP_RETRY_LIMIT_S = 2.0
MAX_BACKOFF_S = 5.0


def ensure_group(client: redis.Redis, model: str) -> None:
    try:
        # Id 0, not $: requests queued before the first worker came up are served too.
        client.xgroup_create(keys.requests(model), keys.WORKER_GROUP, id="0", mkstream=True)
    except redis.ResponseError as error:
        if "BUSYGROUP" not in str(error):
            raise


@dataclass
class Held:
    """A request this worker runs: its stream entry, acknowledged only once its final record is written."""

    entry_id: str
    streams: bool


@dataclass
class Replies:
    watched: list[str] = field(default_factory=list)
    cancel: list = field(default_factory=list)
    owned: list[str] | None = None
    claimed: list = field(default_factory=list)
    new: list = field(default_factory=list)


class WorkerService:
    def __init__(self, settings: Settings, model: str, scheduler: Scheduler, client: redis.Redis, worker_id: str):
        self.settings = settings
        self.model = model
        self.stream = keys.requests(model)
        self.scheduler = scheduler
        self.redis = client
        self.worker_id = worker_id
        self._held: dict[str, Held] = {}  # request id -> its entry
        self._last_heartbeat = 0.0
        self._stop = threading.Event()
        self._own_or_report_lost = client.register_script(OWN_OR_REPORT_LOST)
        self.draining = False

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        self._with_retry(lambda: ensure_group(self.redis, self.model))
        log.info("worker.serving", model=self.model, worker=self.worker_id)
        drain_until = None
        while True:
            if stop.is_set():
                if drain_until is None:
                    self.draining = True
                    drain_until = time.time() + self.settings.delivery.drain_grace_s
                    log.info("worker.draining", running=len(self.scheduler.running), grace_s=drain_until - time.time())
                if not self.scheduler.has_work:
                    break
                if time.time() >= drain_until:
                    self._hand_back()
                    break
            events = self.scheduler.step() if self.scheduler.has_work else []
            self._exchange(events, accept_new=not stop.is_set())
        self._with_retry(lambda: self.redis.zrem(keys.live_workers(self.model), self.worker_id))
        log.info("worker.stopped", worker=self.worker_id)

    def state(self) -> dict:
        return {
            "worker": self.worker_id,
            "model": self.model,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "free_slots": self.scheduler.free_capacity,
            "draining": self.draining,
        }

    # -- Redis, with backoff ---------------------------------------------------------------------------------
    def _with_retry(self, call):
        backoff = 0.1
        while True:
            try:
                return call()
            except (redis.ConnectionError, redis.TimeoutError) as error:
                if self._stop.is_set() and backoff >= STOP_RETRY_LIMIT_S:
                    raise SystemExit(
                        "stopping, and Redis is unreachable: what is unacknowledged stays pending"
                    ) from None
                log.warning("worker.redis_unavailable", error=str(error), retry_in_s=backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            except redis.ResponseError as error:
                if "NOGROUP" not in str(error):
                    raise
                # Redis came back without our data (no AOF, or a fresh instance): recreate the group.
                log.warning("worker.group_missing", stream=self.stream)
                ensure_group(self.redis, self.model)

    # -- one exchange per step -------------------------------------------------------------------------------
    def _exchange(self, events: list[StepEvent], accept_new: bool) -> None:
        finished = {e.request_id for e in events if e.final is not None}
        heartbeat = time.time() - self._last_heartbeat >= HEARTBEAT_INTERVAL_S
        # Built again on every attempt (a failed pipeline is reset) and state changes only once it went through.
        replies = self._with_retry(lambda: self._round_trip(events, finished, heartbeat, accept_new))
        for request_id in finished:
            self._held.pop(request_id, None)
        if heartbeat:
            self._last_heartbeat = time.time()
        for request_id, flag in zip(replies.watched, replies.cancel):
            if flag is not None:
                self.scheduler.cancel(request_id)
        if replies.owned is not None:
            self._release_lost(set(replies.owned), finished)
        accepted = [self._accept(entry_id, fields) for entry_id, fields in replies.new]
        if replies.claimed:
            accepted += self._take_over(replies.claimed)
        accepted = [r for r in accepted if r is not None]
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
            if held is not None and held.streams and (event.delta or event.final is None):
                self._write_delta(pipe, event)
            if event.final is not None:
                self._write_final(pipe, event.final, held.entry_id if held else None)
        slots: dict[str, int] = {}

        def add(name: str, command) -> None:
            slots[name] = len(pipe.command_stack)
            command()

        watched = self.scheduler.request_ids()
        if watched:
            add("cancel", lambda: pipe.mget([keys.cancel(i) for i in watched]))
        capacity = self.scheduler.free_capacity if accept_new else 0
        if heartbeat:
            pipe.zadd(keys.live_workers(self.model), {self.worker_id: time.time()})
            entry_ids = [h.entry_id for rid, h in self._held.items() if rid not in finished]
            if entry_ids:
                add("owned", lambda: self._own_or_report_lost(
                    keys=[self.stream], args=[keys.WORKER_GROUP, self.worker_id, *entry_ids], client=pipe
                ))  # fmt: skip
            if capacity > 0:
                idle_ms = int(self.settings.delivery.reclaim_idle_s * 1000)
                add("claimed", lambda: pipe.xautoclaim(
                    self.stream, keys.WORKER_GROUP, self.worker_id, idle_ms, start_id="0-0", count=capacity
                ))  # fmt: skip
        if capacity > 0:
            block = None if self.scheduler.has_work else IDLE_BLOCK_MS
            add("new", lambda: pipe.xreadgroup(
                keys.WORKER_GROUP, self.worker_id, {self.stream: ">"}, count=capacity, block=block
            ))  # fmt: skip
        elif not self.scheduler.has_work:
            time.sleep(IDLE_BLOCK_MS / 1000)
        replies = pipe.execute()
        result = Replies(watched=watched)
        if "cancel" in slots:
            result.cancel = replies[slots["cancel"]]
        if "owned" in slots:
            result.owned = replies[slots["owned"]]
        if "claimed" in slots:
            result.claimed = replies[slots["claimed"]][1]
        if "new" in slots:
            result.new = [entry for _, entries in replies[slots["new"]] or [] for entry in entries]
        return result

    def _write_delta(self, pipe, event: StepEvent) -> None:
        out = keys.output(event.request_id)
        delta = TokenDelta(text=event.delta, completion_tokens=event.completion_tokens, token_ids=event.token_ids)
        pipe.xadd(out, {"d": delta.model_dump_json()})
        pipe.expire(out, self.settings.token_stream_ttl_s)

    def _write_final(self, pipe, final: FinalResult, entry_id: str | None) -> None:
        body = final.model_dump_json()
        out = keys.output(final.id)
        pipe.xadd(out, {"f": body})
        pipe.expire(out, self.settings.token_stream_ttl_s)
        # NX: should two workers ever finish the same request, the first result stands.
        pipe.set(keys.result(final.id), body, nx=True, ex=self.settings.result_ttl_s)
        if entry_id is not None:
            pipe.xack(self.stream, keys.WORKER_GROUP, entry_id)
            pipe.xdel(self.stream, entry_id)
        log.info(
            "request.finished",
            request_id=final.id,
            finish_reason=final.finish_reason,
            prompt_tokens=final.prompt_tokens,
            completion_tokens=final.completion_tokens,
            total_s=round(final.timings.total_s, 4),
        )

    def _end_now(self, final: FinalResult, entry_id: str, *extra) -> None:
        """Write a final record (and whatever else goes with it) for a request that never reaches the batch."""

        def write() -> None:
            pipe = self.redis.pipeline(transaction=False)
            for command in extra:
                command(pipe)
            self._write_final(pipe, final, entry_id)
            pipe.execute()

        self._with_retry(write)
        self._held.pop(final.id, None)

    # -- intake ----------------------------------------------------------------------------------------------
    def _parse(self, entry_id: str, fields: dict | None) -> InferenceRequest | None:
        try:
            return InferenceRequest.model_validate_json((fields or {}).get("r", ""))
        except ValidationError as error:
            # Unreadable entry: nobody can be told, so only drop it from the group.
            log.error("request.unreadable", entry_id=entry_id, error=str(error))
            self._with_retry(lambda: self.redis.xack(self.stream, keys.WORKER_GROUP, entry_id))
            return None

    def _accept(self, entry_id: str, fields: dict | None) -> InferenceRequest | None:
        """The request in a stream entry, or None when it can only be answered (or dropped) at once."""
        request = self._parse(entry_id, fields)
        if request is None:
            return None
        self._held[request.id] = Held(entry_id, request.stream)
        needed = len(request.prompt_token_ids) + request.sampling.max_tokens
        capacity = self.scheduler.runner.capacity
        if needed > capacity:
            message = f"prompt plus max_tokens ({needed}) exceeds this worker's context ({capacity})"
            self._end_now(self._failed(request, message), entry_id)
            return None
        log.info("request.started", request_id=request.id, prompt_tokens=len(request.prompt_token_ids))
        return request

    def _failed(self, request: InferenceRequest, reason: str) -> FinalResult:
        return FinalResult(
            id=request.id,
            model=self.model,
            finish_reason="error",
            error=reason,
            prompt_tokens=len(request.prompt_token_ids),
            worker=self.worker_id,
        )

    def _take_over(self, claimed: list) -> list[InferenceRequest | None]:
        """Requests reclaimed from dead workers: dead-letter the poison ones, resume the others."""
        parsed = [(entry_id, fields, self._parse(entry_id, fields)) for entry_id, fields in claimed]
        parsed = [(entry_id, fields, r) for entry_id, fields, r in parsed if r is not None]

        def look() -> list:
            pipe = self.redis.pipeline(transaction=False)
            for entry_id, _, request in parsed:
                pipe.xpending_range(self.stream, keys.WORKER_GROUP, min=entry_id, max=entry_id, count=1)
                pipe.xrange(keys.output(request.id))
            return pipe.execute()

        replies = self._with_retry(look)
        taken = []
        for i, (entry_id, fields, request) in enumerate(parsed):
            pending, output = replies[2 * i], replies[2 * i + 1]
            deliveries = pending[0]["times_delivered"] if pending else 1
            point = resume_point(output)
            log.info("request.reclaimed", request_id=request.id, deliveries=deliveries, resumed=len(point.token_ids))
            if request.id in self._held:  # ours all along: we stalled past the idle timeout
                continue
            if point.finished:
                self._with_retry(lambda e=entry_id: self._ack(e))
                continue
            if deliveries > self.settings.delivery.max_deliveries:
                self._dead_letter(entry_id, fields, request, deliveries)
                continue
            resumed = request.model_copy(update={"resume_token_ids": point.token_ids})
            taken.append(self._accept(entry_id, {"r": resumed.model_dump_json()}))
        return taken

    def _ack(self, entry_id: str) -> None:
        self.redis.pipeline(transaction=False).xack(self.stream, keys.WORKER_GROUP, entry_id).xdel(
            self.stream, entry_id
        ).execute()

    def _dead_letter(self, entry_id: str, fields: dict, request: InferenceRequest, deliveries: int) -> None:
        reason = (
            f"delivered {deliveries} times without finishing (its workers died); "
            f"moved to the dead-letter stream {keys.dead_letters(self.model)}"
        )
        log.error("request.dead_lettered", request_id=request.id, deliveries=deliveries)
        record = {"r": fields["r"], "entry_id": entry_id, "reason": reason, "deliveries": deliveries}
        self._end_now(
            self._failed(request, reason), entry_id, lambda pipe: pipe.xadd(keys.dead_letters(self.model), record)
        )

    def _release_lost(self, owned: set[str], finished: set[str]) -> None:
        for request_id, held in list(self._held.items()):
            if request_id not in finished and held.entry_id not in owned:
                log.warning("request.lost_to_another_worker", request_id=request_id)
                self.scheduler.release(request_id)
                del self._held[request_id]

    def _hand_back(self) -> None:
        """Drain time is up: make what is still running claimable by other workers at once, resuming from the
        tokens already streamed (IDLE set past the reclaim timeout; JUSTID: not counted as a delivery)."""
        entry_ids = [h.entry_id for h in self._held.values()]
        log.warning("worker.handing_back", requests=len(entry_ids))
        if entry_ids:
            idle_ms = int(self.settings.delivery.reclaim_idle_s * 1000) + 1
            self._with_retry(lambda: self.redis.xclaim(
                self.stream, keys.WORKER_GROUP, self.worker_id, 0, entry_ids, idle=idle_ms, justid=True
            ))  # fmt: skip
        for request_id in list(self._held):
            self.scheduler.release(request_id)
        self._held.clear()
