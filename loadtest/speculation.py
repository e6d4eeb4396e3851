"""Speculative decoding by prompt lookup, served: the same greedy requests through a fresh local fleet without it
and with it (batch.speculation.num_speculative_tokens), alternated round by round, one request at a time. Three
workloads: answers that quote their prompt (a passage of the repo's public-domain text, asked back word for word),
structured output that copies it (the passage into a JSON schema's field, as a document pipeline extracts fields) and
free chat (the chat workload's topics), where little repeats; every output but the JSON forced to the same length
(the JSON ends where its grammar does, the same in both variants).

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


EXTRACTED = {
    "type": "json_schema",
    "json_schema": {
        "name": "extract",
        "schema": {
            "type": "object",
            "properties": {"passage": {"type": "string"}, "words": {"type": "integer"}},
            "required": ["passage", "words"],
            "additionalProperties": False,
        },
    },
}


def extracting(count: int, seed: int) -> list[list[dict]]:
    """Requests to copy a passage into a JSON object (their response_format: EXTRACTED)."""
    asked = "Put this passage, word for word, into the JSON field passage, and its number of words into words:"
    return [[{"role": "user", "content": m[0]["content"].replace("Repeat this passage word for word:", asked)}]
            for m in quoting(count, seed)]  # fmt: skip


def chatting(count: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    return [chat_messages(rng) for _ in range(count)]


def tokens_per_s(base_url: str, conversations: list[list[dict]], max_tokens: int, shape: dict | None) -> float:
    """Output tokens a second, one request at a time; `shape`: a response_format (then not forced to max_tokens)."""
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    asked = {"response_format": shape} if shape else {"extra_body": {"ignore_eos": True}}
    client.chat.completions.create(model=DEFAULT_MODEL, messages=conversations[0], max_tokens=4, **asked)
    started, made = time.perf_counter(), 0
    for messages in conversations:
        reply = client.chat.completions.create(
            model=DEFAULT_MODEL, messages=messages, max_tokens=max_tokens, temperature=0, **asked
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
    workloads = {
        "quoting": (quoting(args.requests, args.seed), None),
        "extracting (JSON)": (extracting(args.requests, args.seed), EXTRACTED),
        "chat": (chatting(args.requests, args.seed), None),
    }
    variants = {
        "off": {},
        f"{args.tokens} guessed": {"LLMFLEET_BATCH__SPECULATION__NUM_SPECULATIVE_TOKENS": str(args.tokens)},
    }
    print("| round | variant | " + " | ".join(f"{w} tok/s" for w in workloads) + " |", flush=True)
    print("|---|---|" + "---|" * len(workloads), flush=True)
    for round_no in range(args.rounds):
        for name, env in variants.items():
            with local_fleet(env=env) as (base_url, _):
                rates = [tokens_per_s(base_url, w, args.max_tokens, shape) for w, shape in workloads.values()]
            print(f"| {round_no + 1} | {name} | " + " | ".join(f"{r:.1f}" for r in rates) + " |", flush=True)


if __name__ == "__main__":
    main()
