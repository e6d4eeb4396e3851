"""The worker's runner on a GPU, in-process, for a checkpoint loaded as the worker loads it: first whether its logits
match the model's own forward pass (a prompt prefilled in two chunks, then greedy decode steps), then what its steps
cost (decodes of 1 / 32 / 128 sequences, a 512-token prefill), and the GPU memory it took.

    python -m loadtest.gpu_steps DIR [--quantization gptq --gpu-kernel gptq_marlin] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from shared.settings import ModelSpec
from worker import model_loader
from worker.llama_runner import LlamaRunner, PrefillChunk


def median_ms(runner: LlamaRunner, call, repeats: int = 20) -> float:
    call()
    runner.synchronize()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        runner.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def decode(runner: LlamaRunner, batch: int, position: int) -> torch.Tensor:
    """A decode step of sequences in slots 0..batch-1, all at `position`."""
    return runner.step(list(range(batch)), [7] * batch, [position] * batch, [])


@torch.inference_mode()
def check(runner: LlamaRunner, model: torch.nn.Module, prompt: list[int], steps: int = 8) -> dict:
    """Logits of the runner (prompt in two chunks, then greedy decode) against the model's forward pass over the
    whole sequence so far: the largest relative error ||runner - model|| / ||model|| over the steps, and how many
    greedy tokens agree."""
    half = len(prompt) // 2
    runner.step([], [], [], [PrefillChunk(0, prompt[:half], 0)])
    logits = runner.step([], [], [], [PrefillChunk(0, prompt[half:], half)])[0]
    tokens, worst, agree = list(prompt), 0.0, 0
    for _ in range(steps):
        reference = model(torch.tensor([tokens], device=runner.device)).logits[0, -1].float()
        worst = max(worst, float((logits.float() - reference).norm() / reference.norm()))
        token = int(logits.argmax())
        agree += token == int(reference.argmax())
        logits = runner.step([0], [token], [len(tokens)], [])[0]
        tokens.append(token)
    return {"max_relative_error": worst, "greedy_agree": agree, "steps": steps}


def timings(runner: LlamaRunner, batches: list[int], position: int, prefill: int) -> dict:
    result = {}
    for b in batches:
        ms = median_ms(runner, lambda b=b: decode(runner, b, position))
        result[f"decode_{b}"] = {"ms": ms, "tok_s": b * 1000 / ms}
    chunk = PrefillChunk(max(batches), list(range(5, 5 + prefill)), 0)
    ms = median_ms(runner, lambda: runner.step([], [], [], [chunk]), repeats=10)
    result[f"prefill_{prefill}"] = {"ms": ms, "tok_s": prefill * 1000 / ms}
    return result


def profile(runner: LlamaRunner, batch: int, position: int) -> str:
    """Where a decode step of `batch` sequences spends its time: the ops that took most of the device's time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda" else [])
    decode(runner, batch, position)
    runner.synchronize()
    with profiler(activities=activities) as prof:
        for _ in range(5):
            decode(runner, batch, position)
        runner.synchronize()
    sort = "self_cuda_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
    return f"decode {batch}, 5 steps:\n" + prof.key_averages().table(sort_by=sort, row_limit=15)


def run(
    path: Path, spec: ModelSpec, device: torch.device, batches: list[int], position: int, prefill: int,
    profiled: bool = False,
) -> dict:  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    loaded = model_loader.load(path, spec, device)
    load_s = time.perf_counter() - started
    runner = LlamaRunner(loaded.model, slots=max(batches) + 1, capacity=position + prefill + 64)
    layer = loaded.model.model.layers[0].self_attn.q_proj
    result = {
        "model": str(path),
        "quantization": spec.quantization,
        "gpu_kernel": spec.gpu_kernel,
        "layer_class": type(layer).__name__,
        "load_s": load_s,
        "check": check(runner, loaded.model, list(range(100, 164))),
        "steps": timings(runner, batches, position, prefill),
    }
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if profiled:
        result["profiles"] = [profile(runner, b, position) for b in (min(batches), max(batches))]
    return result


def markdown(result: dict) -> str:
    steps = result["steps"]
    cells = " | ".join(f"{k}: {v['ms']:.2f} ms ({v['tok_s']:,.0f} tok/s)" for k, v in steps.items())
    check = result["check"]
    return (
        f"| {Path(result['model']).name} | {result['layer_class']} | {check['max_relative_error']:.2e}, "
        f"{check['greedy_agree']}/{check['steps']} | {cells} | {result.get('peak_gpu_memory_gib', 0):.1f} GiB |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.gpu_steps", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--quantization", choices=["none", "gptq"], default="none")
    parser.add_argument("--gpu-kernel", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--position", type=int, default=512, help="decode steps' position in their sequences")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--profile", action="store_true", help="print the ops of the smallest and largest decode")
    parser.add_argument("--json", type=Path, default=None, help="append the result as a JSON line")
    args = parser.parse_args(argv)
    spec = ModelSpec(path=args.path, quantization=args.quantization, gpu_kernel=args.gpu_kernel)
    device = model_loader.pick_device(args.device)
    result = run(args.path, spec, device, args.batch, args.position, args.prefill, args.profile)
    for table in result.pop("profiles", []):
        print(table)
    if args.json:
        with args.json.open("a") as out:
            out.write(json.dumps(result) + "\n")
    print(markdown(result), flush=True)


if __name__ == "__main__":
    main()
