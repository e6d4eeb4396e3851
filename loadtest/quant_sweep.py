"""Which 4-bit settings keep the default model closest to bf16? Quantizes it once per setting and measures each.

    python -m loadtest.quant_sweep [--only LABEL ...] [--speed]

Each variant is built under <models_dir>/quant-sweep/<label> (kept, so a second run only measures) and scored
like `python -m loadtest.fidelity`: held-out perplexity ratio, probe answers unchanged, weight memory ratio.
"Generated" calibration is text the bf16 model writes itself from neutral topic prompts (no data download)."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from loadtest.engines import ours, prompts
from loadtest.fidelity import HELDOUT, PROBES, agreement, score
from shared.settings import DEFAULT_MODEL, ModelSpec, Settings
from worker import gguf_grid, model_loader, model_store

TOPICS = [
    "the history of the printing press", "how volcanoes form", "a recipe for bread", "the rules of chess",
    "why the sea is salty", "the life of honey bees", "how a bicycle works", "the Roman empire",
    "saving money", "the planets of the solar system", "learning a second language", "how vaccines work",
    "the water cycle", "writing a good e-mail", "sorting algorithms", "the French revolution",
    "growing tomatoes", "how airplanes fly", "the human heart", "climate and weather",
    "a day at the beach", "the invention of the telephone", "healthy breakfast ideas", "how rainbows form",
    "the Python programming language", "ancient Egypt", "how to train a dog", "the moon landing",
    "electric cars", "the works of Shakespeare", "how bread rises", "the Amazon rainforest",
]  # fmt: skip
GENERATED_TOKENS = 256

VARIANTS: dict[str, tuple[ModelSpec, dict, str]] = {
    # label: (bits, group, act-order, sym, mse; other QuantizeConfig fields; calibration)
    # The default: no GPTQ, the GGUF's own Q4_1 blocks carried over (worker.gguf_grid).
    "gguf-grid": (ModelSpec(grid="gguf"), {}, "none"),
    "g64": (ModelSpec(grid="gptq", group_size=64, mse=0), {}, "repo"),
    "g32": (ModelSpec(grid="gptq", group_size=32, mse=0), {}, "repo"),
    # Group 128 is refused by the CPU kernel here: 576 input features are not a multiple of it.
    "g64-act-order": (ModelSpec(grid="gptq", group_size=64, desc_act=True, mse=0), {"act_group_aware": False}, "repo"),
    "g64-asym": (ModelSpec(grid="gptq", group_size=64, sym=False, mse=0), {}, "repo"),
    # The GGUF this model comes from is Q4_1: asymmetric 4-bit in blocks of 32 along the input dimension, the
    # same layout as GPTQ group 32 with sym=False, so that setting might land near the source's own grid.
    "g32-asym": (ModelSpec(grid="gptq", group_size=32, sym=False, mse=0), {}, "repo"),
    "g64-generated": (ModelSpec(grid="gptq", group_size=64, mse=0), {}, "generated"),
    "g32-asym-generated": (ModelSpec(grid="gptq", group_size=32, sym=False, mse=0), {}, "generated"),
    "g64-mse": (ModelSpec(grid="gptq", group_size=64, mse=2.4), {}, "repo"),
    "g32-mse": (ModelSpec(grid="gptq", group_size=32, mse=2.4), {}, "repo"),
    "g32-asym-mse": (ModelSpec(grid="gptq", group_size=32, sym=False, mse=2.4), {}, "repo"),
    "8bit-g64": (ModelSpec(grid="gptq", bits=8, group_size=64, mse=0), {}, "repo"),
    "8bit-g128": (ModelSpec(grid="gptq", bits=8, group_size=128, mse=0), {}, "repo"),
}


@torch.inference_mode()
def generated_calibration(dense: Path, cache: Path) -> list[str]:
    if cache.is_file():
        return json.loads(cache.read_text())
    loaded = model_loader.load(dense, ModelSpec(quantization="none"), torch.device("cpu"))
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    texts = []
    for style in ("Write a short paragraph about {}.", "Explain {} to a curious student.",
                  "Tell me three facts about {}.", "Write a conversation between two friends about {}."):  # fmt: skip
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": style.format(t)}], add_generation_prompt=True, tokenize=False
            )  # fmt: skip
            for t in TOPICS
        ]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = loaded.model.generate(**batch, max_new_tokens=GENERATED_TOKENS, do_sample=True, temperature=0.8,
                                    top_p=0.95, pad_token_id=tokenizer.pad_token_id or 2)  # fmt: skip
        # The whole chat turn, prompt and answer, as the served model sees it.
        texts += tokenizer.batch_decode(out, skip_special_tokens=False)
    texts = [t.replace(tokenizer.pad_token or "<|endoftext|>", "") for t in texts]
    cache.write_text(json.dumps(texts))
    return texts


def score_with_speed(path: Path, spec: ModelSpec, text: str, speed: bool) -> dict:
    loaded, figures = score(path, spec, text)
    figures["speed"] = ""
    if speed:  # greedy decode in our runner, in-process: output tok/s at batch 1 and 32 (the second of two runs)
        rates = []
        for size in (1, 32):
            batch = prompts(loaded.tokenizer, size)
            ours(loaded.model, batch, 32)
            rates.append(f"{ours(loaded.model, batch, 32):.0f}")
        figures["speed"] = " / ".join(rates)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.quant_sweep")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS))
    parser.add_argument(
        "--speed", action="store_true", help="also decode tok/s at batch 1 / 32 (needs a quiet machine)"
    )
    args = parser.parse_args(argv)
    settings = Settings()
    model_loader.configure_torch(settings)
    dense = settings.dense_model_dir(args.model)
    model_store.prepare(settings, args.model)  # the dense directory, built once
    root = settings.models_dir / "quant-sweep"
    root.mkdir(parents=True, exist_ok=True)
    text = HELDOUT.read_text()
    base = score_with_speed(dense, ModelSpec(quantization="none"), text, args.speed)
    print(f"bf16: perplexity {base['ppl']:.2f}, weights {base['bytes'] / 2**20:.0f} MiB {base['speed']}", flush=True)
    columns = ["setting", "calibration", "quantize s", "perplexity", "ppl ratio", "probes unchanged",
               "same first 3 words", "weight MiB", "memory ratio", "tok/s b=1 / b=32"]  # fmt: skip
    print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|", flush=True)
    for label in args.only or VARIANTS:
        spec, options, calibration = VARIANTS[label]
        out = root / label
        took = 0.0
        try:
            if not (out / "config.json").is_file():
                shutil.rmtree(out, ignore_errors=True)
                texts = (
                    generated_calibration(dense, root / "generated-calibration.json")
                    if calibration == "generated"
                    else None
                )
                started = time.monotonic()
                if spec.grid == "gguf":
                    out.mkdir(parents=True)
                    gguf_grid.write_checkpoint(model_store.embedded_gguf_path(), dense, out)
                else:
                    model_store.quantize(dense, out, spec, texts, **options)
                took = time.monotonic() - started
            figures = score_with_speed(out, spec, text, args.speed)
        except Exception as error:  # one setting the kernels refuse must not end the sweep
            print(f"| {label} | {calibration} | failed: {type(error).__name__}: {error} |", flush=True)
            continue
        same, first = agreement(base, figures)
        print(
            f"| {label} | {calibration} | {took:.0f} | {figures['ppl']:.2f} | "
            f"{figures['ppl'] / base['ppl']:.3f} | {same}/{len(PROBES)} | {first}/{len(PROBES)} | "
            f"{figures['bytes'] / 2**20:.0f} | {figures['bytes'] / base['bytes']:.3f} | {figures['speed']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
