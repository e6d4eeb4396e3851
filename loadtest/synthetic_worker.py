"""python -m loadtest.synthetic_worker: a worker without a model, for measuring what one gateway relays.

It speaks the real worker's Redis protocol (shared.keys, shared.protocol; worker/service.py): reads the model's
request stream in group WORKER_GROUP, heartbeats in live_workers, and per step writes one TokenDelta for every
running streaming request to its output stream; a finished request gets its FinalResult on the output stream
and SET NX on its result key, then is acked. It ignores EOS (always emits max_tokens tokens) and cancel flags."""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time

import redis

from shared import keys
from shared.protocol import FinalResult, InferenceRequest, Timings, TokenDelta
from shared.settings import DEFAULT_MODEL, Settings
from worker.service import ensure_group

TOKEN_TEXT = " tok"


class SyntheticWorker:
    def __init__(self, client: redis.Redis, settings: Settings, model: str, step_s: float, max_running: int):
        self.redis = client
        self.settings = settings
        self.model = model
        self.step_s = step_s
        self.max_running = max_running
        self.worker_id = f"synthetic-{os.getpid()}"
        self.running: dict[str, tuple[InferenceRequest, str, int, float]] = {}  # id -> (request, entry, sent, start)

    def run(self, stop: threading.Event) -> None:
        stream = keys.requests(self.model)
        ensure_group(self.redis, stream)
        last_heartbeat = 0.0
        while not stop.is_set():
            step_started = time.time()
            pipe = self.redis.pipeline(transaction=False)
            for request_id, (request, entry_id, sent, started) in list(self.running.items()):
                sent += 1
                if request.stream:
                    delta = TokenDelta(text=TOKEN_TEXT, completion_tokens=sent)
                    pipe.xadd(keys.output(request_id), {"d": delta.model_dump_json()})
                if sent < request.sampling.max_tokens:
                    self.running[request_id] = (request, entry_id, sent, started)
                    continue
                self._finish(pipe, request, entry_id, sent, started, stream)
            if step_started - last_heartbeat >= 1.0:
                pipe.zadd(keys.live_workers(self.model), {self.worker_id: step_started})
                pipe.hset(keys.load(self.model), self.worker_id, len(self.running))
                last_heartbeat = step_started
            free = self.max_running - len(self.running)
            if free > 0:
                block = None if self.running else 200
                pipe.xreadgroup(keys.WORKER_GROUP, self.worker_id, {stream: ">"}, count=free, block=block)
            replies = pipe.execute()
            for _, entries in (replies[-1] or []) if free > 0 else []:
                for entry_id, fields in entries:
                    request = InferenceRequest.model_validate_json(fields["r"])
                    self.running[request.id] = (request, entry_id, 0, time.time())
            if self.step_s:
                time.sleep(max(0.0, self.step_s - (time.time() - step_started)))
        self.redis.zrem(keys.live_workers(self.model), self.worker_id)

    def _finish(self, pipe, request: InferenceRequest, entry_id: str, sent: int, started: float, stream: str) -> None:
        del self.running[request.id]
        now = time.time()
        final = FinalResult(
            id=request.id, model=self.model, text=TOKEN_TEXT * sent, finish_reason="length",
            prompt_tokens=len(request.prompt_token_ids), completion_tokens=sent, worker=self.worker_id,
            timings=Timings(queued_s=started - request.created, total_s=now - request.created),
        )  # fmt: skip
        body = final.model_dump_json()
        out = keys.output(request.id)
        pipe.xadd(out, {"f": body})
        pipe.expire(out, self.settings.token_stream_ttl_s)
        pipe.set(keys.result(request.id), body, nx=True, ex=self.settings.result_ttl_s)
        pipe.xack(stream, keys.WORKER_GROUP, entry_id)
        pipe.xdel(stream, entry_id)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.synthetic_worker")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--step-ms", type=float, default=0.0, help="time per step (one token per stream); 0: flat out")
    parser.add_argument("--max-running", type=int, default=256)
    args = parser.parse_args(argv)
    settings = Settings()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    SyntheticWorker(client, settings, args.model, args.step_ms / 1000, args.max_running).run(stop)


if __name__ == "__main__":
    main()
