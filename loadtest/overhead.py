"""Gateway + Redis overhead at concurrency 1: TTFT through the gateway (streaming openai client) minus TTFT of the
same engine called in-process (the worker's own Scheduler, no Redis, no HTTP) on the same prompts. The two are timed
request by request, alternately, with the fleet up beside the in-process engine, so that a slow spell of a shared
machine hits both alike; the overhead is the p50 of each prompt's difference. Part of it is the openai client's own
work, which no server can remove: timed against a canned response, without a server. For scale, the machine's own
floor: HTTP round trips to a bare ASGI app (loadtest.bare_server) after the same pause and back to back. In a VM a
process whose core has gone idle wakes slowly, and a request through the fleet wakes the gateway, Redis, the worker
and the client in turn."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import httpx

from gateway.prompts import PromptTokenizer, chat_token_ids
from gateway.protocol import ChatCompletionRequest
from llmfleet.supervisor import port_open, wait_until
from loadtest.local_fleet import free_port
from loadtest.servers import Server
from loadtest.stats import pcts
from loadtest.workload import chat_messages, client_for, stream_one
from shared.protocol import InferenceRequest, SamplingParams
from shared.settings import Settings
from worker.__main__ import build_scheduler

SETTLE_S = 0.05
"""Pause before each timed request, so the other side's threads have stopped spinning on the two cores."""


class InProcessEngine:
    def __init__(self, model: str):
        self.settings = Settings()
        self.model = model
        self.scheduler = build_scheduler(self.settings, model, "loadtest-in-process")
        self.prompts = PromptTokenizer(self.settings.model_dir(model))

    def ttft(self, messages: list[dict], max_tokens: int) -> float:
        """Seconds from Scheduler.add to the step that produced the first token; the request then runs to its end."""
        body = ChatCompletionRequest.model_validate({"model": self.model, "messages": messages})
        ids = chat_token_ids(self.prompts, body)
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        request = InferenceRequest(
            id=f"in-process-{time.perf_counter_ns()}", model=self.model, prompt_token_ids=ids, sampling=sampling,
            deadline=time.time() + self.settings.request_timeout_s,
        )  # fmt: skip
        started = time.perf_counter()
        self.scheduler.add(request)
        first = None
        while self.scheduler.has_work:
            events = self.scheduler.step()
            if first is None and any(e.completion_tokens >= 1 or e.final for e in events):
                first = time.perf_counter() - started
        return first


async def paired_ttfts(
    server: Server, engine: InProcessEngine, requests: int, max_tokens: int, seed: int
) -> tuple[list[float], list[float]]:
    """(TTFTs through the gateway, TTFTs in-process), prompt by prompt, after one warm-up request each way."""
    rng = random.Random(seed)
    prompts = [chat_messages(rng) for _ in range(requests)]
    client = client_for(server)
    await stream_one(client, server, prompts[0], 4, True)
    engine.ttft(prompts[0], 4)
    gateway, in_process = [], []
    for messages in prompts:
        time.sleep(SETTLE_S)
        trace = await stream_one(client, server, messages, max_tokens, True)
        if trace.error is not None or trace.first_token is None:
            raise RuntimeError(f"overhead: a request through the gateway failed: {trace.error}")
        gateway.append(trace.first_token - trace.started)
        time.sleep(SETTLE_S)
        in_process.append(engine.ttft(messages, max_tokens))
    await client.close()
    return gateway, in_process


def canned_stream(request: httpx.Request) -> httpx.Response:
    """What a server streams for a one-token answer: the role chunk, the token, the finish, the usage, [DONE]."""
    base = {"id": "chatcmpl-canned", "object": "chat.completion.chunk", "created": 0, "model": "canned"}
    deltas = [({"role": "assistant", "content": ""}, None), ({"content": " Once"}, None), ({}, "length")]
    chunks = [{**base, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": f}]} for d, f in deltas]
    chunks.append({**base, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body.encode())


async def client_ttfts(model: str, requests: int, seed: int) -> list[float]:
    """Seconds from the streaming openai client's create() to its first content chunk, against a canned response
    through httpx.MockTransport: the client's own work in each TTFT through the gateway."""
    rng = random.Random(seed)
    server = Server("canned", "http://canned/v1", model)
    client = client_for(server, httpx.AsyncClient(transport=httpx.MockTransport(canned_stream)))
    ttfts = []
    for messages in [chat_messages(rng) for _ in range(requests + 1)]:
        trace = await stream_one(client, server, messages, 1, True)
        ttfts.append(trace.first_token - trace.started)
    await client.close()
    return ttfts[1:]  # the first one warms the client up


async def bare_round_trips(requests: int) -> dict[str, list[float]]:
    """Seconds of each HTTP round trip to loadtest.bare_server in a process of its own: {"after_pause": each after
    SETTLE_S, as the timed requests are, "back_to_back": none between}."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "loadtest.bare_server", str(port)])
    try:
        wait_until(lambda: port_open("127.0.0.1", port), 30, "loadtest.bare_server")
        times: dict[str, list[float]] = {"after_pause": [], "back_to_back": []}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            await client.post("/", content=b"{}")
            for name, pause in (("after_pause", SETTLE_S), ("back_to_back", 0.0)):
                for _ in range(requests):
                    time.sleep(pause)
                    started = time.perf_counter()
                    (await client.post("/", content=b"{}")).raise_for_status()
                    times[name].append(time.perf_counter() - started)
        return times
    finally:
        server.terminate()
        server.wait(timeout=10)


def overhead(gateway: list[float], in_process: list[float], client: list[float], bare: dict[str, list[float]]) -> dict:
    gaps = [g - e for g, e in zip(gateway, in_process)]
    return {
        "gateway_ttft": pcts(gateway),
        "engine_ttft": pcts(in_process),
        "overhead_p50_s": pcts(gaps)["p50"],
        "client_own_p50_s": pcts(client)["p50"],
        "bare_round_trip_p50_s": {name: pcts(times)["p50"] for name, times in bare.items()},
    }
