"""Quantization fidelity: is the served 4-bit model as good as bf16? Speed must not be bought with quality.

    python -m loadtest.fidelity

Prints perplexity on a held-out public-domain text shipped with the repo (loadtest/data/heldout.txt: the US
Declaration of Independence and the Gettysburg Address; not in the calibration set), the share of a fixed probe
set whose greedy answers are unchanged, and weight memory, for the served 4-bit model against bf16; and, as the
noise floor of the probe figure, how many answers the same bf16 weights give differently computed in float32.
These go through transformers' forward over the 4-bit layers; the perplexity also through the worker's own step
(worker.llama_runner: its attention, norm and activation kernels and its bf16 KV cache), as the model is served."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from shared.settings import DEFAULT_MODEL, ModelSpec, Settings
from worker import model_loader
from worker.block_quant import BlockQuantLinear
from worker.llama_runner import LlamaRunner, PrefillChunk

HELDOUT = Path(__file__).with_name("data") / "heldout.txt"
PROBES = [
    "What is the capital of France?", "How many legs does a spider have?", "What is 12 times 12?",
    "Name the largest planet in our solar system.", "What colour is the sky on a clear day?",
    "Who wrote Romeo and Juliet?", "What is the boiling point of water in Celsius?",
    "Translate 'thank you' into French.",
    "What is the opposite of hot?", "Give me a synonym for happy.", "What language is spoken in Brazil?",
    "How many days are in a week?", "What do bees make?", "What is the chemical symbol for water?",
    "Which ocean is the largest?", "What is the square root of 81?", "Name a primary colour.",
    "What gas do plants absorb from the air?", "What is the freezing point of water in Fahrenheit?",
    "How many continents are there?",
]  # fmt: skip
PROBE_TOKENS = 24


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, window: int = 512) -> float:
    """Through transformers' forward, window by window."""
    return windowed_perplexity(lambda ids: model(torch.tensor([ids])).logits[0], tokenizer, text, window)


def served_perplexity(model, tokenizer, text: str, window: int = 512) -> float:
    """Through the worker's step: each window prefilled in one step as chunks of one token, so that every position
    has its logits (the kernels give a prompt row the same bits in any chunk)."""
    runner = LlamaRunner(model, slots=1, capacity=window)

    def logits(ids: list[int]) -> torch.Tensor:
        return runner.step([], [], [], [PrefillChunk(0, [token], i) for i, token in enumerate(ids)])

    return windowed_perplexity(logits, tokenizer, text, window)


def windowed_perplexity(logits_of, tokenizer, text: str, window: int) -> float:
    """`text`'s perplexity in windows of `window` tokens, each from an empty context; logits_of(ids) gives the logits
    after each of ids."""
    ids = tokenizer(text)["input_ids"]
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window + 1]
        logits = logits_of(chunk[:-1]).float()
        nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum"))
        count += len(chunk) - 1
    return math.exp(nll / count)


@torch.inference_mode()
def greedy_answers(model, tokenizer) -> list[str]:
    answers = []
    for question in PROBES:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**ids, max_new_tokens=PROBE_TOKENS, do_sample=False, pad_token_id=2)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return answers


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:  # tied embeddings count once
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def score(path: Path, spec: ModelSpec, text: str) -> tuple[object, dict]:
    """The loaded model, and its perplexity on `text`, greedy probe answers and weight bytes."""
    loaded = model_loader.load(path, spec, torch.device("cpu"))
    figures = {
        "ppl": perplexity(loaded.model, loaded.tokenizer, text),
        "answers": greedy_answers(loaded.model, loaded.tokenizer),
        "bytes": weight_bytes(loaded.model),
    }
    return loaded, figures


def agreement(base: dict, quant: dict) -> tuple[int, int]:
    """Probe answers identical, and answers that start with the same three words."""
    pairs = list(zip(base["answers"], quant["answers"]))
    return sum(a == b for a, b in pairs), sum(a.split()[:3] == b.split()[:3] for a, b in pairs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.fidelity")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args(argv)
    settings = Settings()
    model_loader.configure_torch(settings)
    text = HELDOUT.read_text()
    dense = settings.dense_model_dir(args.model)
    _, base = score(dense, ModelSpec(quantization="none"), text)
    quant_loaded, quant = score(settings.model_dir(args.model), settings.models[args.model], text)
    same, first_words = agreement(base, quant)
    spec = settings.models[args.model]
    if spec.grid == "gguf":
        embedding = "Q8_0" if isinstance(quant_loaded.model.lm_head, BlockQuantLinear) else "bf16"
        print(f"quantization: the GGUF's own Q4_1 blocks (4-bit, group 32, a float minimum per group), {embedding} "
              "embedding")  # fmt: skip
    else:
        print(f"quantization: GPTQ {spec.bits}-bit, group {spec.group_size}, act-order {spec.desc_act}, "
              f"sym {spec.sym}, mse {spec.mse}")  # fmt: skip
    # The same weights computed in float32: how many probe answers arithmetic alone changes.
    _, wide = score(dense, ModelSpec(quantization="none", dtype="float32"), text)
    floor_same, floor_first = agreement(base, wide)
    print(
        f"noise floor: bf16 vs float32 of the same weights, perplexity {wide['ppl']:.2f}, probe answers unchanged "
        f"{floor_same}/{len(PROBES)}, same first 3 words {floor_first}/{len(PROBES)}"
    )
    print("| figure | bf16 | 4-bit | ratio | target |\n|---|---|---|---|---|")
    ratio = quant["ppl"] / base["ppl"]
    print(f"| perplexity (held-out) | {base['ppl']:.2f} | {quant['ppl']:.2f} | {ratio:.3f} | ≤ 1.03 |")
    served = served_perplexity(quant_loaded.model, quant_loaded.tokenizer, text)
    print(f"| perplexity, 4-bit through the worker's step | {base['ppl']:.2f} | {served:.2f} | "
          f"{served / base['ppl']:.3f} | ≤ 1.03 |")  # fmt: skip
    print(f"| probe answers unchanged ({PROBE_TOKENS} greedy tokens) | – | {same}/{len(PROBES)} | "
          f"{same / len(PROBES):.2f} | ≥ 0.90 |")  # fmt: skip
    print(
        f"| probe answers, same first 3 words | – | {first_words}/{len(PROBES)} | {first_words / len(PROBES):.2f} | – |"
    )
    print(f"| weight memory MiB | {base['bytes'] / 2**20:.0f} | {quant['bytes'] / 2**20:.0f} | "
          f"{quant['bytes'] / base['bytes']:.3f} | ≤ 0.35 |")  # fmt: skip


if __name__ == "__main__":
    main()
