"""Engine choice, measured in-process (no gateway, no Redis): output tokens/s of greedy decoding at several batch
sizes for transformers' continuous-batching manager, plain `generate`, and our runner, in GPTQ and bf16.

    python -m loadtest.engines [--batch 1 8 32] [--tokens 64] [--quant gptq none]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GenerationConfig

from shared.settings import DEFAULT_MODEL, ModelSpec, Settings
from worker import model_loader
from worker.llama_runner import LlamaRunner, PrefillChunk


def prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Tell me a story about the number {i}."}],
            add_generation_prompt=True,
            tokenize=False,
        )
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def ours(model, batch: list[list[int]], tokens: int) -> float:
    runner = LlamaRunner(model, slots=len(batch), capacity=max(map(len, batch)) + tokens + 1)
    started = time.perf_counter()
    logits = runner.step([], [], [], [PrefillChunk(i, p, 0) for i, p in enumerate(batch)])
    nxt = logits.argmax(-1).tolist()
    for step in range(tokens - 1):
        logits = runner.step(list(range(len(batch))), nxt, [len(p) + step for p in batch], [])
        nxt = logits.argmax(-1).tolist()
    return len(batch) * tokens / (time.perf_counter() - started)


def plain_generate(model, tokenizer, batch: list[list[int]], tokens: int) -> float:
    width = max(map(len, batch))
    ids = torch.tensor([[2] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
            pad_token_id=2,
        )  # fmt: skip
    return len(batch) * tokens / (time.perf_counter() - started)


def cb_manager(model, batch: list[list[int]], tokens: int) -> float:
    config = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=-1, pad_token_id=2)
    model.set_attn_implementation("paged|sdpa")
    try:
        model.generate_batch(batch[:1], generation_config=config)  # warm-up
        started = time.perf_counter()
        out = model.generate_batch(batch, generation_config=config)
        produced = sum(len(o.generated_tokens) for o in out.values())
        return produced / (time.perf_counter() - started)
    finally:
        model.set_attn_implementation("sdpa")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.engines")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--quant", nargs="+", default=["gptq", "none"])
    # The manager runs last: it leaves a multi-GiB paged cache (and threads) behind that would slow the others.
    parser.add_argument("--engines", nargs="+", default=["ours", "generate", "cb-manager"])
    args = parser.parse_args(argv)
    settings = Settings()
    model_loader.configure_torch(settings)
    print("| engine | weights | " + " | ".join(f"batch {b}" for b in args.batch) + " |")
    print("|---|---|" + "---|" * len(args.batch))
    for quant in args.quant:
        spec = ModelSpec(quantization=quant)
        path = settings.model_dir(DEFAULT_MODEL) if quant == "gptq" else settings.dense_model_dir(DEFAULT_MODEL)
        loaded = model_loader.load(path, spec, torch.device("cpu"))
        all_prompts = prompts(loaded.tokenizer, max(args.batch))
        for engine in args.engines:
            figures = []
            for b in args.batch:
                batch = all_prompts[:b]
                if engine == "ours":
                    ours(loaded.model, batch, 4)  # warm-up
                    figures.append(ours(loaded.model, batch, args.tokens))
                elif engine == "generate":
                    figures.append(plain_generate(loaded.model, loaded.tokenizer, batch, args.tokens))
                else:
                    figures.append(cb_manager(loaded.model, batch, args.tokens))
            print(f"| {engine} | {quant} | " + " | ".join(f"{f:.0f}" for f in figures) + " |", flush=True)


if __name__ == "__main__":
    main()
