"""python -m worker [--model NAME]: prepare and load one model, then serve its stream until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import threading
import uuid

import redis
import structlog

from shared.logging import configure as configure_logging
from shared.settings import DEFAULT_MODEL, Settings
from worker import model_loader, model_store
from worker.http_server import WorkerHTTPServer
from worker.llama_runner import LlamaRunner
from worker.scheduler import Scheduler
from worker.service import WorkerService

log = structlog.get_logger(__name__)


def build_scheduler(settings: Settings, model: str, worker_id: str) -> Scheduler:
    model_loader.configure_torch(settings)
    spec = settings.models[model]
    path = model_store.prepare(settings, model)
    loaded = model_loader.load(path, spec, model_loader.pick_device(settings.device))
    batch = settings.batch
    # With a prefix cache, as many extra slots as running ones park finished sequences for reuse.
    slots = batch.max_running * (2 if batch.prefix_cache_tokens else 1)
    runner = LlamaRunner(loaded.model, slots=slots, capacity=spec.max_context)
    scheduler = Scheduler(
        runner,
        loaded.tokenizer,
        loaded.eos_token_ids,
        max_prefill_tokens=batch.max_prefill_tokens,
        model_name=model,
        worker_id=worker_id,
        max_running=batch.max_running,
        prefix_cache_tokens=batch.prefix_cache_tokens,
    )
    warm_up(runner)
    return scheduler


def warm_up(runner: LlamaRunner) -> None:
    """One prefill and one decode step, so kernels are compiled before the first request waits on them."""
    from worker.llama_runner import PrefillChunk

    runner.step([], [], [], [PrefillChunk(0, [1, 2, 3], 0)])
    runner.step([0], [4], [3], [])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--id", default=None, help="worker id (default: host-pid-random)")
    parser.add_argument("--http-port", type=int, default=None, help="port of /health and /ready (0: none)")
    parser.add_argument("--prepare-only", action="store_true", help="build the model directory if needed, then exit")
    args = parser.parse_args(argv)

    settings = Settings()
    worker_id = args.id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    configure_logging(settings.log_level, process=f"worker:{worker_id}")
    if args.model not in settings.models:
        parser.error(f"unknown model {args.model!r}; configured: {sorted(settings.models)}")

    if args.prepare_only:
        model_loader.configure_torch(settings)
        print(model_store.prepare(settings, args.model))
        return

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    service: WorkerService | None = None

    def ready() -> tuple[int, dict]:
        # Ready once the model is loaded and warm, until the drain starts.
        if service is None or service.draining:
            return 503, {"status": "draining" if service else "loading", "worker": worker_id}
        return 200, {"status": "ready", **service.state()}

    def health() -> tuple[int, dict]:
        return 200, {"status": "ok", **(service.state() if service else {"worker": worker_id})}

    http_port = settings.worker_http_port if args.http_port is None else args.http_port
    http = None
    if http_port:
        http = WorkerHTTPServer(settings.gateway_host, http_port, {"/health": health, "/ready": ready}).start()

    scheduler = build_scheduler(settings, args.model, worker_id)
    client = redis.Redis.from_url(
        settings.redis_url, decode_responses=True, socket_timeout=30, health_check_interval=30
    )
    service = WorkerService(settings, args.model, scheduler, client, worker_id)
    service.run(stop)
    if http is not None:
        http.stop()


if __name__ == "__main__":
    main()
