"""Drives an OpenAI-compatible server with the official async client: N concurrent streaming clients, fixed
seed, forced output length in the form the server accepts (loadtest.servers)."""

from __future__ import annotations

import asyncio
import functools
import json
import random
import time

import httpx
import openai

from loadtest.servers import Server
from loadtest.stats import RequestTrace, Summary, failure_reason, percentile, summarise

TOPICS = ["the ocean", "a lighthouse", "volcanoes", "the history of tea", "a robot learning to paint",
          "winter in a city", "honeybees", "the first computer", "a long train journey", "mountains at dawn",
          "a lost key", "jazz music"]  # fmt: skip


def chat_messages(rng: random.Random) -> list[dict]:
    return [{"role": "user", "content": f"Write a short story about {rng.choice(TOPICS)}."}]


def client_for(server: Server, http: httpx.AsyncClient | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=server.base_url, api_key="loadtest", max_retries=0, timeout=600, http_client=http
    )


def _request_fields(server: Server, messages: list[dict], max_tokens: int, force: bool) -> tuple[dict, dict]:
    """A workload's streaming request: the OpenAI fields, and the server's own ones that force the output length."""
    fields = {"model": server.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
              "stream_options": {"include_usage": True}}  # fmt: skip
    return fields, server.forced(max_tokens) if force else {}


def _note_content(trace: RequestTrace, now: float, content: str | None) -> None:
    if content:
        if trace.first_token is None:
            trace.first_token = now
        trace.token_times.append(now)
        trace.text += content


async def stream_one(
    client: openai.AsyncOpenAI,
    server: Server,
    messages: list[dict],
    max_tokens: int,
    force: bool,
    extra: dict | None = None,
) -> RequestTrace:
    """`extra`: more of the server's own fields (vLLM's `priority`)."""
    trace = RequestTrace(started=time.perf_counter())
    fields, forced = _request_fields(server, messages, max_tokens, force)
    try:
        stream = await client.chat.completions.create(**fields, extra_body={**forced, **(extra or {})})
        async for chunk in stream:
            _note_content(trace, time.perf_counter(), chunk.choices[0].delta.content if chunk.choices else None)
            if chunk.usage:
                trace.completion_tokens = chunk.usage.completion_tokens
                trace.prompt_tokens = chunk.usage.prompt_tokens
                details = chunk.usage.prompt_tokens_details
                trace.cached_tokens = details.cached_tokens if details else None
    except openai.OpenAIError as error:
        trace.error = failure_reason(error)
    trace.ended = time.perf_counter()
    return trace


async def stream_one_raw(
    http: httpx.AsyncClient, server: Server, messages: list[dict], max_tokens: int, force: bool
) -> RequestTrace:
    """stream_one with the SSE lines read by hand: a client that costs a fraction of the openai client's CPU, for the
    relay, whose figure must not be the client's limit."""
    trace = RequestTrace(started=time.perf_counter())
    fields, forced = _request_fields(server, messages, max_tokens, force)
    body = fields | forced
    try:
        async with http.stream("POST", f"{server.base_url}/chat/completions", json=body) as reply:
            reply.raise_for_status()
            async for line in reply.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                now, chunk = time.perf_counter(), json.loads(line[6:])
                if "error" in chunk:
                    raise ValueError(chunk["error"].get("message"))
                _note_content(trace, now, chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None)
                if chunk.get("usage"):
                    trace.completion_tokens = chunk["usage"]["completion_tokens"]
                    trace.prompt_tokens = chunk["usage"]["prompt_tokens"]
    except (httpx.HTTPError, ValueError) as error:
        trace.error = failure_reason(error)
    trace.ended = time.perf_counter()
    return trace


async def run_streams(
    server: Server,
    prompts: list[list[dict]],
    concurrency: int,
    max_tokens: int,
    force: bool,
    workload: str,
    raw: bool = False,
) -> tuple[Summary, list[RequestTrace]]:
    """`concurrency` users take the prompts in order, one streaming request at a time each; `raw`: through
    stream_one_raw instead of the openai client."""
    if raw:
        http = httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 1))
        one, close = functools.partial(stream_one_raw, http), http.aclose
    else:
        client = client_for(server)
        one, close = functools.partial(stream_one, client), client.close
    queue: asyncio.Queue = asyncio.Queue()
    for item in enumerate(prompts):
        queue.put_nowait(item)
    traces: list[RequestTrace] = []

    async def user() -> None:
        while not queue.empty():
            index, messages = queue.get_nowait()
            trace = await one(server, messages, max_tokens, force)
            trace.prompt_index = index
            traces.append(trace)

    # One warm-up request so that first-use costs do not land in the figures.
    await one(server, prompts[0], 4, force)
    started = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    await close()
    return summarise(server.label, concurrency, traces, wall, workload, server.peer), traces


async def run_chat(
    server: Server, concurrency: int, requests: int, max_tokens: int, force: bool, seed: int, raw: bool = False
) -> Summary:
    rng = random.Random(seed)
    prompts = [chat_messages(rng) for _ in range(requests)]
    summary, _ = await run_streams(server, prompts, concurrency, max_tokens, force, "chat", raw)
    return summary


SYSTEM_PROMPT = (
    "You are a patient, precise assistant for the public library of a small town. Answer questions about books, "
    "authors, opening hours, memberships, events and local history. Keep answers short and friendly, say when you "
    "are not sure, and suggest where to look next.\n\n"
    "Facts you may use:\n"
    "- Opening hours: Monday to Friday 9:00 to 19:00, Saturday 10:00 to 16:00, closed on Sundays and public "
    "holidays. The reading room closes fifteen minutes before the building does.\n"
    "- Membership is free for residents; bring a proof of address. Visitors pay five euros a year. Children under "
    "twelve need a parent or guardian to sign the form.\n"
    "- Members borrow up to ten books, four audiobooks and two films at a time, for three weeks. A loan can be "
    "renewed twice online, by phone or at the desk, unless someone else has reserved the item.\n"
    "- Late returns cost twenty cents a day per item, capped at five euros; children's books have no late fees.\n"
    "- Reservations are free; we hold a reserved item for seven days after we tell you it is ready.\n"
    "- The local history room keeps the town newspaper since 1874 on microfilm, parish records, maps and "
    "photographs; ask the archivist on Tuesdays and Thursdays.\n"
    "- Events: a reading club on the first Wednesday of each month, story time for children every Saturday at "
    "eleven, a writing workshop in spring and a book sale in October.\n"
    "- The building has step-free access, a lift, large-print books and a hearing loop at the desk.\n"
    "Never invent a title or an author; when a question is outside these facts, say so and offer to ask a "
    "librarian."
)
TURNS = ["Can you recommend a classic novel?", "Who wrote it and when?", "What is it about, in two sentences?",
         "Is there a similar book you would suggest?", "How long would it take to read?"]  # fmt: skip


async def run_multiturn(server: Server, conversations: int, concurrency: int, turns: int, max_tokens: int) -> Summary:
    """Conversations of `turns` turns, each resending the whole history after a shared system prompt.
    The summary over all turns carries TTFT p50 per turn index (seconds) in extra["ttft_p50_by_turn"] and the
    share of prompt tokens served from the prefix cache in extra["cached_share_by_turn"]."""
    client = client_for(server)
    by_turn: list[list[RequestTrace]] = [[] for _ in range(turns)]
    traces: list[RequestTrace] = []
    pending = list(range(conversations))

    async def conversation(index: int) -> None:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        for turn in range(turns):
            messages.append({"role": "user", "content": f"(conversation {index}) {TURNS[turn % len(TURNS)]}"})
            trace = await stream_one(client, server, messages, max_tokens, force=True)
            traces.append(trace)
            if trace.error:
                return
            by_turn[turn].append(trace)
            messages.append({"role": "assistant", "content": trace.text})

    async def user() -> None:
        while pending:
            await conversation(pending.pop())

    started = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    await client.close()
    summary = summarise(server.label, concurrency, traces, wall, "multiturn", server.peer)
    summary.extra["ttft_p50_by_turn"] = [percentile([t.first_token - t.started for t in ts], 50) for ts in by_turn]
    summary.extra["cached_share_by_turn"] = [_cached_share(ts) for ts in by_turn]
    return summary


def _cached_share(traces: list[RequestTrace]) -> float | None:
    """Share of the prompt tokens served from the prefix cache, if the server reports it."""
    if not traces or any(t.cached_tokens is None for t in traces):
        return None
    return sum(t.cached_tokens for t in traces) / max(1, sum(t.prompt_tokens for t in traces))
