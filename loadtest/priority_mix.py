"""The priority workload: urgent streaming chat next to a background load of more streams than the worker has slots,
so that requests queue. Urgent requests carry `priority` -1 where the server schedules by priority
(scheduling_policy "priority", the `priority` variant), the background none (0); elsewhere neither carries one.
`--variants default priority` sets the two policies side by side: the urgent TTFT is what the lanes buy, the
background's tok/s what they cost."""

from __future__ import annotations

import asyncio
import random
import time

from loadtest.servers import Server
from loadtest.stats import RequestTrace, Summary, summarise
from loadtest.workload import chat_messages, client_for, stream_one

URGENT_PRIORITY = -1
FILL_S = 5.0
"""How long the background runs before the first urgent request: the queue fills."""
URGENT_PAUSE_S = 0.2


async def run_priority(
    server: Server, background: int, urgent_requests: int, max_tokens: int, seed: int, fill_s: float = FILL_S
) -> list[Summary]:
    """[the urgent requests, one at a time; the background's requests that ended meanwhile]."""
    client = client_for(server)
    stop = asyncio.Event()
    background_traces: list[RequestTrace] = []

    async def background_user(index: int) -> None:
        rng = random.Random(seed + 1 + index)
        while not stop.is_set():
            background_traces.append(await stream_one(client, server, chat_messages(rng), max_tokens, True))

    urgent = {"priority": URGENT_PRIORITY} if server.priorities else {}
    rng = random.Random(seed)
    await stream_one(client, server, chat_messages(rng), 4, True, urgent)  # warm-up
    users = [asyncio.ensure_future(background_user(i)) for i in range(background)]
    await asyncio.sleep(fill_s)
    started = time.perf_counter()
    urgent_traces = []
    for _ in range(urgent_requests):
        urgent_traces.append(await stream_one(client, server, chat_messages(rng), max_tokens, True, urgent))
        await asyncio.sleep(URGENT_PAUSE_S)
    ended = time.perf_counter()
    stop.set()
    await asyncio.gather(*users)
    await client.close()
    meanwhile = [t for t in background_traces if started <= t.ended <= ended]
    return [
        summarise(server.label, 1, urgent_traces, ended - started, "priority urgent", server.peer),
        summarise(server.label, background, meanwhile, ended - started, "priority background", server.peer),
    ]
