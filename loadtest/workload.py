"""Drives an OpenAI-compatible server with the official async client: N concurrent streaming clients, fixed
seed, forced output length where the server accepts it (`ignore_eos`, as vLLM does)."""

from __future__ import annotations

import asyncio
import random
import time

import openai

from loadtest.stats import RequestTrace, Summary, percentile, summarise

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
                trace.text += chunk.choices[0].delta.content
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


SYSTEM_PROMPT = (
    "You are a patient, precise assistant for a public library. "
    + "Answer questions about books, authors, opening hours, memberships, events and local history. "
    + "Keep answers short and friendly, say when you are not sure, and suggest where to look next. " * 6
)
TURNS = ["Can you recommend a classic novel?", "Who wrote it and when?", "What is it about, in two sentences?",
         "Is there a similar book you would suggest?", "How long would it take to read?"]  # fmt: skip


async def run_multiturn(
    base_url: str, model: str, conversations: int, concurrency: int, turns: int, max_tokens: int, label: str
) -> dict:
    """Conversations of `turns` turns, each resending the whole history after a shared system prompt.
    Returns TTFT p50 per turn index (seconds) and the summary over all turns."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="loadtest", max_retries=0, timeout=600)
    by_turn: list[list[float]] = [[] for _ in range(turns)]
    traces: list[RequestTrace] = []
    pending = list(range(conversations))

    async def conversation(index: int) -> None:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        for turn in range(turns):
            messages.append({"role": "user", "content": f"(conversation {index}) {TURNS[turn % len(TURNS)]}"})
            trace = await _one(client, model, messages, max_tokens, force=True)
            traces.append(trace)
            if trace.error:
                return
            by_turn[turn].append(trace.first_token - trace.started)
            messages.append({"role": "assistant", "content": trace.text})

    async def user() -> None:
        while pending:
            await conversation(pending.pop())

    started = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    await client.close()
    return {
        "label": label,
        "ttft_p50_by_turn": [percentile(values, 50) for values in by_turn],
        "summary": summarise(label, concurrency, traces, wall).as_dict(),
    }
