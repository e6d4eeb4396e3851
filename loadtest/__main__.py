"""python -m loadtest WORKLOAD: the benchmark. Either against a running service (--url, e.g. from scripts/start)
or with --start, on a fresh local fleet per variant, so one invocation compares settings side by side.

    python -m loadtest chat --concurrency 1 8 32 --baseline generate
    python -m loadtest multiturn --start --variants cache-on cache-off
    python -m loadtest multiturn --start --workers 2 --variants cache-on affinity-off

    python -m loadtest batch-mix --concurrency 8 --batch-lines 256   # needs `python -m jobs` (llmfleet up)

Every run writes JSON and a Markdown table to loadtest/out/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from contextlib import nullcontext
from pathlib import Path

from loadtest import batch_workload
from loadtest.local_fleet import local_fleet
from loadtest.stats import table
from loadtest.workload import run_chat, run_multiturn
from shared.settings import DEFAULT_MODEL

VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "cache-on": {},
    "cache-off": {"LLMFLEET_BATCH__PREFIX_CACHE_TOKENS": "0"},
    "affinity-off": {"LLMFLEET_AFFINITY": "false"},
}


def _fleets(args: argparse.Namespace):
    """(variant name, context manager yielding a base URL) for each variant to run."""
    if not args.start:
        return [("running service", nullcontext(args.url))]
    return [(name, local_fleet(args.workers, VARIANTS[name])) for name in args.variants]


def _chat(args: argparse.Namespace) -> tuple[list[dict], str]:
    summaries = []
    for variant, fleet in _fleets(args):
        with fleet as url:
            for c in args.concurrency:
                label = f"llmfleet {variant}"
                summary = asyncio.run(
                    run_chat(
                        url,
                        args.model,
                        c,
                        max(c * args.requests_per_user, 8),
                        args.max_tokens,
                        not args.no_force,
                        args.seed,
                        label,
                    )  # fmt: skip
                )
                summaries.append(summary)
                print(table([summary]).splitlines()[-1], flush=True)
    if args.baseline == "generate":
        from loadtest.generate_baseline import run_generate

        summaries += run_generate(args.model, args.concurrency, args.max_tokens, args.seed)
    return [s.as_dict() for s in summaries], table(summaries)


def _multiturn(args: argparse.Namespace) -> tuple[list[dict], str]:
    results = []
    for variant, fleet in _fleets(args):
        with fleet as url:
            label = f"{variant}, {args.workers} worker(s)" if args.start else variant
            result = asyncio.run(
                run_multiturn(url, args.model, args.conversations, args.concurrency, args.turns, args.max_tokens, label)
            )
            results.append(result)
            print(label, [round(v * 1000) if v is not None else None for v in result["ttft_p50_by_turn"]], flush=True)
    head = "| variant | " + " | ".join(f"turn {i + 1} TTFT p50 ms" for i in range(args.turns)) + " | errors |"
    rows = [
        f"| {r['label']} | "
        + " | ".join("-" if v is None else f"{v * 1000:.0f}" for v in r["ttft_p50_by_turn"])
        + f" | {r['summary']['errors']} |"
        for r in results
    ]
    return results, "\n".join([head, "|---" * (args.turns + 2) + "|", *rows])


def _batch_mix(args: argparse.Namespace) -> tuple[list[dict], str]:
    """Interactive chat alone, then next to a running batch: what a batch costs interactive TTFT."""
    summaries, runs = [], []
    for c in args.concurrency:
        for with_batch in (False, True):
            summary, batch = asyncio.run(_interactive_next_to_batch(args, c, with_batch))
            summaries.append(summary)
            runs.append({**summary.as_dict(), "batch": None if batch is None else vars(batch)})
            print(table([summary]).splitlines()[-1], flush=True)
            if batch is not None:
                print(f"  batch: {batch.completed}/{batch.lines} lines {batch.status} in {batch.wall_s:.1f}s "
                      f"({batch.lines_per_s:.1f} lines/s)", flush=True)  # fmt: skip
    return runs, table(summaries)


async def _interactive_next_to_batch(args: argparse.Namespace, concurrency: int, with_batch: bool):
    batch_client = batch_id = None
    started = time.perf_counter()
    if with_batch:
        batch_client, batch_id = await batch_workload.submit(
            args.url, args.model, args.batch_lines, args.batch_max_tokens, args.seed
        )
        await asyncio.sleep(2.0)  # let the batch fill the worker before interactive traffic starts
    label = f"interactive + batch of {args.batch_lines}" if with_batch else "interactive alone"
    summary = await run_chat(
        args.url, args.model, concurrency, max(concurrency * args.requests_per_user, 8), args.max_tokens,
        True, args.seed, label,
    )  # fmt: skip
    batch = await batch_workload.wait_done(batch_client, batch_id, started) if with_batch else None
    return summary, batch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest")
    workloads = parser.add_subparsers(dest="workload", required=True)
    for name, run in (("chat", _chat), ("multiturn", _multiturn)):
        sub = workloads.add_parser(name)
        sub.set_defaults(run=run)
        sub.add_argument("--url", default="http://127.0.0.1:8000/v1")
        sub.add_argument("--start", action="store_true", help="start a fresh local fleet for each variant")
        sub.add_argument("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS))
        sub.add_argument("--workers", type=int, default=1)
        sub.add_argument("--model", default=DEFAULT_MODEL)
        sub.add_argument("--seed", type=int, default=1234)
        sub.add_argument("--out", default="loadtest/out")
    chat = workloads.choices["chat"]
    chat.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    chat.add_argument("--requests-per-user", type=int, default=4)
    chat.add_argument("--max-tokens", type=int, default=64)
    chat.add_argument("--no-force", action="store_true", help="let EOS end answers early")
    chat.add_argument("--baseline", choices=["none", "generate"], default="none")
    multiturn = workloads.choices["multiturn"]
    multiturn.add_argument("--conversations", type=int, default=8)
    multiturn.add_argument("--concurrency", type=int, default=4)
    multiturn.add_argument("--turns", type=int, default=4)
    multiturn.add_argument("--max-tokens", type=int, default=32)
    mix = workloads.add_parser("batch-mix", help="interactive chat alone and next to a batch (/v1/batches)")
    mix.set_defaults(run=_batch_mix)
    mix.add_argument("--url", default="http://127.0.0.1:8000/v1")
    mix.add_argument("--model", default=DEFAULT_MODEL)
    mix.add_argument("--seed", type=int, default=1234)
    mix.add_argument("--out", default="loadtest/out")
    mix.add_argument("--concurrency", type=int, nargs="+", default=[8])
    mix.add_argument("--requests-per-user", type=int, default=4)
    mix.add_argument("--max-tokens", type=int, default=64)
    mix.add_argument("--batch-lines", type=int, default=256)
    mix.add_argument("--batch-max-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    runs, report = args.run(args)
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {"argv": {k: v for k, v in vars(args).items() if k != "run"}, "host": platform.node()}
    (out / f"{args.workload}-{stamp}.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    (out / f"{args.workload}-{stamp}.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
