"""The long-prompt workload: prompts of 0.5–1.5k tokens cut from the held-out text at seeded offsets, and how
much the streams already running stall while a 1.5k-token prompt is prefilled."""

from __future__ import annotations

import random
from pathlib import Path

from transformers import AutoTokenizer

from loadtest.servers import Server
from loadtest.stats import RequestTrace, Summary, pcts
from loadtest.workload import run_streams
from shared.settings import Settings

TEXT = Path(__file__).parent / "data" / "heldout.txt"
SHORTEST, LONGEST = 512, 1536
PROBE_EVERY = 4
"""Every 4th prompt is exactly LONGEST tokens: the prefills whose effect on running streams is measured."""


def long_prompts(model: str, requests: int, seed: int) -> tuple[list[list[dict]], set[int]]:
    """(chat prompts, indexes of the LONGEST-token ones). Each starts at its own offset in the text, so no two
    share a prefix beyond the chat template's."""
    tokenizer = AutoTokenizer.from_pretrained(Settings().model_dir(model))
    ids = tokenizer(TEXT.read_text(), add_special_tokens=False)["input_ids"]
    while len(ids) < 2 * LONGEST:
        ids = ids + ids
    rng = random.Random(seed)
    prompts, probes = [], set()
    for i in range(requests):
        probe = i % PROBE_EVERY == PROBE_EVERY - 1
        length = LONGEST if probe else rng.randint(SHORTEST, LONGEST)
        start = rng.randrange(len(ids) - length)
        excerpt = tokenizer.decode(ids[start : start + length])
        prompts.append([{"role": "user", "content": excerpt + "\n\nSummarise the text above in one paragraph."}])
        if probe:
            probes.add(i)
    return prompts, probes


def gaps_during_prefills(traces: list[RequestTrace], probes: set[int]) -> list[float]:
    """Inter-token gaps of other streams that overlap the prefill (start to first token) of a probe prompt."""
    windows = [(t, t.started, t.first_token or t.ended) for t in traces if t.prompt_index in probes and not t.error]
    gaps = []
    for trace in traces:
        if trace.error:
            continue
        for a, b in zip(trace.token_times, trace.token_times[1:]):
            if any(a < end and b > start for probe, start, end in windows if probe is not trace):
                gaps.append(b - a)
    return gaps


async def run_long(server: Server, model: str, concurrency: int, requests: int, max_tokens: int, seed: int) -> Summary:
    prompts, probes = long_prompts(model, requests, seed)
    summary, traces = await run_streams(server, prompts, concurrency, max_tokens, True, "long")
    summary.extra["itl_during_long_prefill"] = pcts(gaps_during_prefills(traces, probes))
    summary.extra["prompt_tokens"] = f"{SHORTEST}-{LONGEST}, every {PROBE_EVERY}th exactly {LONGEST}"
    return summary
