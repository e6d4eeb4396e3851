"""What `llmfleet batch submit` and `llmfleet jobs get` do, through the gateway's HTTP API and the openai client."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
from tqdm import tqdm

TERMINAL = ("completed", "failed", "expired", "cancelled")
POLL_INTERVAL_S = 1.0


def submit_batch(
    client: openai.OpenAI, path: Path, endpoint: str, wait: bool, output: Path | None, poll_s: float = POLL_INTERVAL_S
) -> int:
    with path.open("rb") as handle:
        upload = client.files.create(file=(path.name, handle), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint=endpoint, completion_window="24h")
    print(f"batch {batch.id} ({batch.status})", flush=True)
    if not wait:
        return 0
    with tqdm(desc=batch.id, unit="line") as bar:
        while batch.status not in TERMINAL:
            time.sleep(poll_s)
            batch = client.batches.retrieve(batch.id)
            counts = batch.request_counts
            if counts is not None and counts.total:
                bar.total = counts.total
                bar.n = counts.completed + counts.failed
                bar.set_postfix(failed=counts.failed, status=batch.status)
                bar.refresh()
    counts = batch.request_counts
    print(f"batch {batch.id} {batch.status}: {counts.completed} completed, {counts.failed} failed", flush=True)
    if batch.output_file_id is None:
        return 1
    target = output or path.with_name(f"{path.stem}.results.jsonl")
    target.write_bytes(client.files.content(batch.output_file_id).content)
    print(f"results: {target}", flush=True)
    return 0 if batch.status == "completed" else 1


def print_job(base_url: str, api_key: str, job_id: str) -> int:
    reply = httpx.get(f"{base_url}/jobs/{job_id}", headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
    print(json.dumps(reply.json(), indent=2))
    return 0 if reply.status_code == 200 else 1
