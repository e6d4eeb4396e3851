"""Embeddings throughput: texts through the gateway's /v1/embeddings (the openai client, several texts a request, a
few requests at once) against transformers' forward in-process on the model as the worker loads it (batches of the
same size, padded on the left, last-token pooling), alternated round by round, so the report carries the ratio.

    python -m loadtest.embeddings                 # a fresh local fleet (llmfleet up), then the baseline
    python -m loadtest.embeddings --url http://127.0.0.1:8000/v1   # a running gateway (the baseline beside it)
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path

import openai
import torch

from loadtest.local_fleet import local_fleet
from shared.settings import DEFAULT_MODEL, Settings

TEXT = Path(__file__).resolve().parent.parent / "worker" / "calibration.txt"


def texts(count: int, seed: int) -> list[str]:
    """`count` passages of 60-200 words of the repo's public-domain text, at fixed places."""
    rng = random.Random(seed)
    words = TEXT.read_text().split()
    starts = [rng.randrange(len(words) - 200) for _ in range(count)]
    return [" ".join(words[start : start + rng.randint(60, 200)]) for start in starts]


async def through_gateway(
    base_url: str, model: str, inputs: list[str], per_request: int, concurrency: int, api_key: str = "unused"
):
    """(inputs/s, prompt tokens/s, the embeddings in order)."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)
    await client.embeddings.create(model=model, input=inputs[:2])  # warm-up
    gate = asyncio.Semaphore(concurrency)

    async def one(batch: list[str]):
        async with gate:
            return await client.embeddings.create(model=model, input=batch)

    started = time.perf_counter()
    replies = await asyncio.gather(*(one(inputs[i : i + per_request]) for i in range(0, len(inputs), per_request)))
    seconds = time.perf_counter() - started
    await client.close()
    tokens = sum(r.usage.prompt_tokens for r in replies)
    return len(inputs) / seconds, tokens / seconds, [d.embedding for r in replies for d in r.data]


class InProcess:
    """The baseline: transformers' forward over the model as the worker loads it, with the tokenizer's padding."""

    def __init__(self, model: str):
        from worker import model_loader

        settings = Settings()
        model_loader.configure_torch(settings)
        loaded = model_loader.load(settings.model_dir(model), settings.models[model], torch.device("cpu"))
        self.tokenizer = loaded.tokenizer
        self.tokenizer.padding_side = "left"
        self.tokenizer.pad_token = self.tokenizer.pad_token or self.tokenizer.eos_token
        self.model = loaded.model.model

    @torch.inference_mode()
    def embed(self, batch: list[str]) -> tuple[torch.Tensor, int]:
        encoded = self.tokenizer(batch, return_tensors="pt", padding=True)
        last = self.model(**encoded).last_hidden_state[:, -1].float()
        return torch.nn.functional.normalize(last, dim=-1), int(encoded["attention_mask"].sum())

    def run(self, inputs: list[str], per_request: int) -> tuple[float, float, list[list[float]]]:
        self.embed(inputs[:2])  # warm-up
        started, tokens, vectors = time.perf_counter(), 0, []
        for i in range(0, len(inputs), per_request):
            embedded, counted = self.embed(inputs[i : i + per_request])
            tokens += counted
            vectors += embedded.tolist()
        seconds = time.perf_counter() - started
        return len(inputs) / seconds, tokens / seconds, vectors


def agreement(ours: list[list[float]], theirs: list[list[float]]) -> float:
    """The least cosine between the two runs' embeddings of the same input."""
    return float((torch.tensor(ours) * torch.tensor(theirs)).sum(-1).min())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.embeddings")
    parser.add_argument("--url", default=None, help="a running gateway's /v1 (default: start a local fleet)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--inputs", type=int, default=128)
    parser.add_argument("--per-request", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    inputs = texts(args.inputs, args.seed)
    print("| round | llmfleet inputs/s | prompt tok/s | transformers in-process inputs/s | prompt tok/s | ratio | "
          "least cosine |\n|---|---|---|---|---|---|---|", flush=True)  # fmt: skip
    for round_no in range(args.rounds):
        if args.url:
            ours = asyncio.run(through_gateway(args.url, args.model, inputs, args.per_request, args.concurrency))
        else:
            with local_fleet() as (base_url, _):
                ours = asyncio.run(through_gateway(base_url, args.model, inputs, args.per_request, args.concurrency))
        theirs = InProcess(args.model).run(inputs, args.per_request)  # the fleet stopped: one server at a time
        print(
            f"| {round_no + 1} | {ours[0]:.1f} | {ours[1]:,.0f} | {theirs[0]:.1f} | {theirs[1]:,.0f} | "
            f"{ours[0] / theirs[0]:.2f}x | {agreement(ours[2], theirs[2]):.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
