"""The mixed workload: interactive streaming chat alone, then while a batch load runs on the same server. The
batch is `batch` requests submitted at once: an llmfleet batch (files + /v1/batches, loadtest.batch_workload)
where the server has that API, else (the peer) as many concurrent non-streaming requests."""

from __future__ import annotations

import asyncio
import random
import time

import openai

from loadtest import batch_workload
from loadtest.servers import Server
from loadtest.stats import RequestTrace, Summary, failure_reason, summarise
from loadtest.workload import chat_messages, client_for, run_chat


async def _plain(client: openai.AsyncOpenAI, server: Server, messages: list[dict], max_tokens: int, timeout: float):
    trace = RequestTrace(started=time.perf_counter())
    try:
        reply = await client.chat.completions.create(
            model=server.model, messages=messages, max_tokens=max_tokens, temperature=0,
            extra_body=server.forced(max_tokens), timeout=timeout,
        )  # fmt: skip
        trace.completion_tokens = reply.usage.completion_tokens if reply.usage else 0
    except openai.OpenAIError as error:
        trace.error = failure_reason(error)
    trace.ended = time.perf_counter()
    return trace


async def run_mixed(
    server: Server,
    interactive_concurrency: int,
    interactive_requests: int,
    batch: int,
    max_tokens: int,
    batch_max_tokens: int,
    seed: int,
    timeout_s: float,
) -> list[Summary]:
    """[interactive alone, interactive next to the batch, the batch]. Batch requests sent as plain requests and
    not done within timeout_s count as errors; an llmfleet batch reports its own line counts."""
    alone = await run_chat(server, interactive_concurrency, interactive_requests, max_tokens, True, seed)
    alone.workload = "mixed interactive alone"
    started = time.perf_counter()
    if server.batches_api:
        client, batch_id = await batch_workload.submit(server.base_url, server.model, batch, batch_max_tokens, seed)
        batch_run = asyncio.ensure_future(
            asyncio.wait_for(batch_workload.wait_done(client, batch_id, started), timeout_s)
        )
    else:
        client = client_for(server)
        rng = random.Random(seed + 1)
        prompts = [chat_messages(rng) for _ in range(batch)]
        batch_run = asyncio.gather(*(_plain(client, server, p, batch_max_tokens, timeout_s) for p in prompts))
    interactive = await run_chat(server, interactive_concurrency, interactive_requests, max_tokens, True, seed)
    interactive.workload = "mixed interactive + batch"
    if server.batches_api:
        try:
            run = await batch_run
        except TimeoutError:
            run = batch_workload.BatchRun(batch, 0, 0, time.perf_counter() - started, "timed out")
        # Output is forced to batch_max_tokens, so completed lines say how many tokens were produced.
        tokens = run.completed * batch_max_tokens
        summary = Summary(
            server.label, batch, run.lines, run.lines - run.completed, run.wall_s, tokens, tokens / run.wall_s,
            run.lines_per_s, *({"p50": None, "p95": None, "p99": None},) * 3, workload="mixed batch",
            peer=server.peer,
        )  # fmt: skip
        summary.extra["batch_via"] = f"/v1/batches ({run.status})"
    else:
        traces = await batch_run
        await client.close()
        summary = summarise(server.label, batch, traces, time.perf_counter() - started, "mixed batch", server.peer)
        summary.extra["batch_via"] = "concurrent non-streaming requests (no batch API)"
    return [alone, interactive, summary]
