"""What the worker's building blocks cost on this CPU, in-process: one layer's MLP (the served 4-bit kernel, ATen's
int4 kernel where the served one is our own, bf16 and float32 dense) by rows per call, and whole runner steps
(prefills of several lengths, decodes of several batch sizes). Best of a few runs each; the figures behind the
dtype choices in worker.llama_runner and worker.step_cost.

    python -m loadtest.engine_steps
"""

from __future__ import annotations

import argparse

import torch

from shared.settings import DEFAULT_MODEL, ModelSpec, Settings
from worker import cpu_kernels, model_loader
from worker.llama_runner import LlamaRunner, PrefillChunk
from worker.step_cost import best_seconds


def best_ms(call, repeats: int) -> float:
    call()  # warm-up
    return best_seconds(call, repeats) * 1000


@torch.inference_mode()
def mlp_table(models: dict[str, torch.nn.Module], rows: list[int], rounds: int = 5) -> None:
    """The models take turns, round after round, so that a slow spell of a shared machine hits them alike."""
    print("| rows | " + " | ".join(models) + " |\n|---|" + "---|" * len(models))
    for m in rows:
        calls = {}
        for name, model in models.items():
            mlp = model.model.layers[0].mlp
            calls[name] = lambda mlp=mlp, x=torch.randn(m, model.config.hidden_size, dtype=model.dtype): mlp(x)
            calls[name]()  # warm-up
        ms = dict.fromkeys(models, float("inf"))
        for _ in range(rounds):
            for name, call in calls.items():
                ms[name] = min(ms[name], best_seconds(call, 3) * 1000)
        cells = []
        for name, model in models.items():
            flops = 2 * m * 3 * model.config.hidden_size * model.config.intermediate_size
            cells.append(f"{ms[name]:.2f} ms ({flops / ms[name] / 1e6:.0f} GFLOP/s)")
        print(f"| {m} | " + " | ".join(cells) + " |")


def step_table(model: torch.nn.Module, prefills: list[int], batches: list[int], position: int) -> None:
    runner = LlamaRunner(model, slots=max(batches) + 1, capacity=position + max(prefills) + 64)
    spare = max(batches)
    print(f"compute dtype (attention, KV cache): {runner.compute_dtype}\n| step | ms |\n|---|---|")
    for n in prefills:
        chunk = PrefillChunk(spare, list(range(5, 5 + n)), 0)
        print(f"| prefill {n} tokens | {best_ms(lambda c=chunk: runner.step([], [], [], [c]), 3):.0f} |")
    for b in batches:
        ms = best_ms(lambda b=b: runner.step(list(range(b)), [7] * b, [position] * b, []), 3)
        print(f"| decode {b} at position {position} | {ms:.0f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.engine_steps")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128, 512])
    parser.add_argument("--prefill", type=int, nargs="+", default=[32, 128, 399])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 32])
    args = parser.parse_args(argv)
    settings = Settings()
    model_loader.configure_torch(settings)
    cpu = torch.device("cpu")
    spec = settings.models[args.model]
    served = model_loader.load(settings.model_dir(args.model), spec, cpu).model
    dense = settings.dense_model_dir(args.model)
    models = {"4-bit (served)": served}
    if cpu_kernels.available() and spec.cpu_kernel == "auto":
        aten = spec.model_copy(update={"cpu_kernel": "aten"})
        models["4-bit, ATen int4 kernel"] = model_loader.load(settings.model_dir(args.model), aten, cpu).model
    for dtype in ("bfloat16", "float32"):
        models[f"{dtype} dense"] = model_loader.load(dense, ModelSpec(quantization="none", dtype=dtype), cpu).model
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"CPU capability: {capability}, own kernels: {cpu_kernels.isa()}, threads {torch.get_num_threads()}\n")
    mlp_table(models, args.rows)
    print()
    step_table(served, args.prefill, args.batch, position=450)


if __name__ == "__main__":
    main()
