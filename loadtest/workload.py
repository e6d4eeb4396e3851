"""Drives an OpenAI-compatible server with the official async client: N concurrent streaming clients, fixed
seed, forced output length where the server accepts it (`ignore_eos`, as vLLM does)."""

from __future__ import annotations

import asyncio
import random
import time

import openai

from loadtest.stats import RequestTrace, Summary, summarise

TOPICS = ["the ocean", "a lighthouse", "volcanoes", "the history of tea", "a robot learning to paint",
          "winter in a city", "honeybees", "the first computer", "a long train journey", "mountains at dawn",
          "a lost key", "jazz music"]  # fmt: skip


def chat_messages(rng: random.Random) -> list[dict]:
    return [{"role": "user", "content": f"Write a short story about {rng.choice(TOPICS)}."}]


async def _one(
    client: openai.AsyncOpenAI, model: str, messages: list[dict], max_tokens: int, force: bool
) -> RequestTrace:
    trace = RequestTrace(started=time.perf_counter())
    extra = {"ignore_eos": True} if force else {}
    try:
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body=extra,
        )  # fmt: skip
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].delta.content:
                if trace.first_token is None:
                    trace.first_token = now
                trace.token_times.append(now)
            if chunk.usage:
                trace.completion_tokens = chunk.usage.completion_tokens
    except openai.OpenAIError as error:
        trace.error = f"{type(error).__name__}: {error}"
    trace.ended = time.perf_counter()
    return trace


async def run_chat(
    base_url: str, model: str, concurrency: int, requests: int, max_tokens: int, force: bool, seed: int, label: str
) -> Summary:
    rng = random.Random(seed)
    prompts = [chat_messages(rng) for _ in range(requests)]
    client = openai.AsyncOpenAI(base_url=base_url, api_key="loadtest", max_retries=0, timeout=600)
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    traces: list[RequestTrace] = []

    async def user() -> None:
        while not queue.empty():
            traces.append(await _one(client, model, queue.get_nowait(), max_tokens, force))

    # One warm-up request so that first-use costs do not land in the figures.
    await _one(client, model, prompts[0], 4, force)
    started = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    await client.close()
    return summarise(label, concurrency, traces, wall)
