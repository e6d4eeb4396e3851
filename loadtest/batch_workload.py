"""A batch workload next to the interactive one: the same chat prompts as JSONL lines, submitted through the
openai client's files/batches calls and polled until done, to show what a running batch costs interactive TTFT."""

from __future__ import annotations

import asyncio
import io
import json
import random
import time
from dataclasses import dataclass

import openai

from loadtest.workload import chat_messages

TERMINAL = ("completed", "failed", "expired", "cancelled")


@dataclass
class BatchRun:
    lines: int
    completed: int
    failed: int
    wall_s: float
    status: str

    @property
    def lines_per_s(self) -> float:
        return self.completed / self.wall_s if self.wall_s else 0.0


def batch_lines(model: str, lines: int, max_tokens: int, seed: int) -> bytes:
    rng = random.Random(seed + 1)
    rows = []
    for i in range(lines):
        body = {"model": model, "messages": chat_messages(rng), "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        rows.append(
            json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        )
    return "\n".join(rows).encode()


async def submit(base_url: str, model: str, lines: int, max_tokens: int, seed: int) -> tuple[openai.AsyncOpenAI, str]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="loadtest", max_retries=0, timeout=600)
    upload = await client.files.create(
        file=("loadtest.jsonl", io.BytesIO(batch_lines(model, lines, max_tokens, seed))), purpose="batch"
    )
    batch = await client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return client, batch.id


async def wait_done(client: openai.AsyncOpenAI, batch_id: str, started: float) -> BatchRun:
    while True:
        batch = await client.batches.retrieve(batch_id)
        if batch.status in TERMINAL:
            counts = batch.request_counts
            await client.close()
            return BatchRun(counts.total, counts.completed, counts.failed, time.perf_counter() - started, batch.status)
        await asyncio.sleep(0.5)
