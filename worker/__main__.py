"""python -m worker [--model NAME]: prepare and load one model, then serve its stream until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import threading
import uuid

import redis
import structlog
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from shared import tracing
from shared.logging import configure as configure_logging
from shared.settings import DEFAULT_MODEL, Settings
from worker import cpu_kernels, lora, model_loader, model_store, runner_choice, step_cost
from worker.http_server import WorkerHTTPServer
from worker.llama_runner import ModelNotServable
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
    runner = runner_choice.build(loaded.model, spec, slots, batch.batch_invariant)
    configured = {name: lora.load(name, path, loaded.model) for name, path in spec.lora_modules.items()}
    adapters = lora.Adapters(model, loaded.model, configured, spec.runtime_lora_dir, spec.max_loaded_loras)
    runner.prefault(min(batch.kv_prefault_tokens, spec.max_context))
    cost = step_cost.measure(runner)
    step_s = batch.prefill_step_ms / 1000
    prefill_tokens = cost.prefill_budget(step_s, batch.max_prefill_tokens)
    log.info(
        "worker.step_cost",
        overhead_ms=round(cost.overhead_s * 1000, 1),
        per_token_ms=round(cost.per_token_s * 1000, 2),
        prefill_tokens_per_step=prefill_tokens,
        compute_dtype=str(runner.compute_dtype),
        device=str(loaded.device),
        # Where a step's many rows go on a CPU (worker.block_quant.TileRows), or None.
        tile_op=cpu_kernels.tile_op() if loaded.device.type == "cpu" else None,
    )
    return Scheduler(
        runner,
        loaded.tokenizer,
        loaded.eos_token_ids,
        prefill_budget=step_cost.PrefillBudget(prefill_tokens, step_s, batch.max_prefill_tokens, cost.fixed_tokens),
        model_name=model,
        worker_id=worker_id,
        max_running=batch.max_running,
        prefix_cache_tokens=batch.prefix_cache_tokens,
        adapters=adapters,
        speculation=batch.speculation,
    )


@contextlib.contextmanager
def refusing(model: str):
    """A model the worker cannot serve ends the process with EX_CONFIG, its reason logged: the supervisor (llmfleet
    up) does not restart a worker that exits so."""
    try:
        yield
    except (ModelNotServable, lora.AdapterNotServable) as error:
        log.error("worker.model_not_servable", model=model, reason=str(error))
        raise SystemExit(os.EX_CONFIG) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--id", default=None, help="worker id (default: host-pid-random)")
    parser.add_argument(
        "--prepare-only", action="store_true", help="build the model directory and CPU kernels if needed, then exit"
    )
    args = parser.parse_args(argv)

    settings = Settings()
    worker_id = args.id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    configure_logging(settings.log_level, process=f"worker:{worker_id}")
    if args.model not in settings.models:
        parser.error(f"unknown model {args.model!r}; configured: {sorted(settings.models)}")

    if args.prepare_only:
        model_loader.configure_torch(settings)
        path = model_store.prepare(settings, args.model)
        with refusing(args.model):  # at build time, not first at start-up
            config = AutoConfig.from_pretrained(path)
            runner_choice.choose(config, settings.models[args.model])
            if adapters := settings.models[args.model].lora_modules:
                with torch.device("meta"):  # the layers' names and shapes, no weights
                    skeleton = AutoModelForCausalLM.from_config(config)
                for name, adapter in adapters.items():
                    lora.load(name, adapter, skeleton)
        print(path)
        if model_loader.pick_device(settings.device).type == "cpu":
            cpu_kernels.block_quant_op()  # builds the kernels, and times the block kernel's variants once
        return

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    http = WorkerHTTPServer(settings.worker_http_host, settings.worker_http_port, settings.worker_stall_s).start()
    log.info("worker.http", host=settings.worker_http_host, port=http.port)
    try:
        with refusing(args.model):
            scheduler = build_scheduler(settings, args.model, worker_id)
    except SystemExit:
        http.stop()
        raise
    client = redis.Redis.from_url(
        settings.redis_url, decode_responses=True, socket_timeout=30, health_check_interval=30
    )
    traces = tracing.provider(settings, "llmfleet-worker")
    tracer = traces.get_tracer("llmfleet.worker") if traces is not None else None
    http.service = WorkerService(settings, args.model, scheduler, client, worker_id, tracer)
    try:
        http.service.run(stop)
    finally:
        http.stop()


if __name__ == "__main__":
    main()
