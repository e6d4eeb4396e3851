"""Gateway + Redis overhead at concurrency 1: TTFT through the gateway (streaming openai client) minus TTFT of
the same engine called in-process (the worker's own Scheduler, no Redis, no HTTP) on the same prompts, p50."""

from __future__ import annotations

import random
import time

from gateway.prompts import chat_token_ids
from gateway.protocol import ChatCompletionRequest
from loadtest.stats import pcts
from loadtest.workload import chat_messages
from shared.protocol import InferenceRequest, SamplingParams
from shared.settings import Settings
from worker.__main__ import build_scheduler


def engine_ttfts(model: str, requests: int, max_tokens: int, seed: int) -> list[float]:
    """Seconds from Scheduler.add to the step that produced each request's first token, one request at a time,
    after the same warm-up request run_chat sends."""
    settings = Settings()
    scheduler = build_scheduler(settings, model, "loadtest-in-process")
    rng = random.Random(seed)
    prompts = [chat_messages(rng) for _ in range(requests)]

    def ttft(messages: list[dict], tokens: int) -> float:
        body = ChatCompletionRequest.model_validate({"model": model, "messages": messages})
        ids = chat_token_ids(scheduler.tokenizer, body)
        sampling = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        request = InferenceRequest(
            id=f"in-process-{time.perf_counter_ns()}", model=model, prompt_token_ids=ids, sampling=sampling,
            deadline=time.time() + settings.request_timeout_s,
        )  # fmt: skip
        started = time.perf_counter()
        scheduler.add(request)
        first = None
        while scheduler.has_work:
            events = scheduler.step()
            if first is None and any(e.completion_tokens >= 1 or e.final for e in events):
                first = time.perf_counter() - started
        return first

    ttft(prompts[0], 4)
    return [ttft(p, max_tokens) for p in prompts]


def overhead(gateway_ttft: dict, engine: list[float]) -> dict:
    engine_pcts = pcts(engine)
    gap = None if gateway_ttft["p50"] is None else gateway_ttft["p50"] - engine_pcts["p50"]
    return {"gateway_ttft": gateway_ttft, "engine_ttft": engine_pcts, "overhead_p50_s": gap}
