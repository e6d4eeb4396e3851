"""The in-process baseline: transformers' plain `generate` on the same model, batch = concurrency, same prompts
and forced output length. Reported next to the served figures so every report carries the ratio."""

from __future__ import annotations

import random
import time

import torch

from loadtest.stats import Summary
from loadtest.workload import chat_messages
from shared.settings import Settings
from worker import model_loader


def run_generate(model: str, batch_sizes: list[int], max_tokens: int, seed: int) -> list[Summary]:
    settings = Settings()
    model_loader.configure_torch(settings)
    loaded = model_loader.load(settings.model_dir(model), settings.models[model], torch.device("cpu"))
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "left"
    rng = random.Random(seed)
    summaries = []
    for batch in batch_sizes:
        texts = [
            tokenizer.apply_chat_template(chat_messages(rng), add_generation_prompt=True, tokenize=False)
            for _ in range(batch)
        ]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        kwargs = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=2)
        loaded.model.generate(**inputs, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        started = time.perf_counter()
        with torch.inference_mode():
            loaded.model.generate(**inputs, **kwargs)
        wall = time.perf_counter() - started
        tokens = batch * max_tokens
        none = {"p50": None, "p95": None, "p99": None}
        summaries.append(
            Summary(
                "generate (in-process)",
                batch,
                batch,
                0,
                wall,
                tokens,
                tokens / wall,
                batch / wall,
                none,
                none,
                {"p50": wall, "p95": wall, "p99": wall},
            )  # fmt: skip
        )
    return summaries
