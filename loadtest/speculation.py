"""Speculative decoding by prompt lookup, served: the same greedy requests through a fresh local fleet without it
and with it (batch.speculation.num_speculative_tokens), alternated round by round, one request at a time. Two
workloads: answers that quote their prompt (a passage of the repo's public-domain text, asked back word for word) and
free chat (the chat workload's topics), where little repeats; every output forced to the same length.

    python -m loadtest.speculation                      # 2 rounds, 4 tokens guessed
    python -m loadtest.speculation --tokens 8 --rounds 3
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import openai

from loadtest.local_fleet import local_fleet
from loadtest.workload import chat_messages
from shared.settings import DEFAULT_MODEL

TEXT = Path(__file__).resolve().parent.parent / "worker" / "calibration.txt"


def quoting(count: int, seed: int) -> list[list[dict]]:
    """Requests to repeat a passage of 40-80 words exactly."""
    rng = random.Random(seed)
    words = TEXT.read_text().split()
    passages = [
        " ".join(words[s : s + rng.randint(40, 80)]) for s in (rng.randrange(len(words) - 80) for _ in range(count))
    ]
    return [[{"role": "user", "content": f"Repeat this passage word for word:\n\n{p}"}] for p in passages]


def chatting(count: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    return [chat_messages(rng) for _ in range(count)]


def tokens_per_s(base_url: str, conversations: list[list[dict]], max_tokens: int) -> float:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    extra = {"ignore_eos": True}
    client.chat.completions.create(model=DEFAULT_MODEL, messages=conversations[0], max_tokens=4, extra_body=extra)
    started, made = time.perf_counter(), 0
    for messages in conversations:
        reply = client.chat.completions.create(
            model=DEFAULT_MODEL, messages=messages, max_tokens=max_tokens, temperature=0, extra_body=extra
        )
        made += reply.usage.completion_tokens
    return made / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.speculation")
    parser.add_argument("--tokens", type=int, default=4, help="num_speculative_tokens of the variant with it")
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    workloads = {"quoting": quoting(args.requests, args.seed), "chat": chatting(args.requests, args.seed)}
    variants = {
        "off": {},
        f"{args.tokens} guessed": {"LLMFLEET_BATCH__SPECULATION__NUM_SPECULATIVE_TOKENS": str(args.tokens)},
    }
    print("| round | variant | " + " | ".join(f"{w} tok/s" for w in workloads) + " |", flush=True)
    print("|---|---|" + "---|" * len(workloads), flush=True)
    for round_no in range(args.rounds):
        for name, env in variants.items():
            with local_fleet(env=env) as (base_url, _):
                rates = [tokens_per_s(base_url, w, args.max_tokens) for w in workloads.values()]
            print(f"| {round_no + 1} | {name} | " + " | ".join(f"{r:.1f}" for r in rates) + " |", flush=True)


if __name__ == "__main__":
    main()
