"""python -m loadtest WORKLOAD: the benchmark. Against a running service (--url, e.g. from scripts/start) or, with
--start, a fresh local fleet per variant; --peer also starts each named peer in turn (one server at a time) and
runs the same workload on it, so the report carries llmfleet/peer ratios.

    python -m loadtest chat --concurrency 1 8 32 --baseline generate
    python -m loadtest long --start --peer transformers-serve
    python -m loadtest multiturn --start --workers 2 --variants cache-on affinity-off
    python -m loadtest mixed --start --peer transformers-serve   # chat alone, then next to a batch (/v1/batches)
    python -m loadtest priority --start --variants default priority   # urgent requests beside a queue, per policy
    python -m loadtest overhead --start          # TTFT through the gateway minus TTFT in-process, c=1
    python -m loadtest relay                     # streamed tokens/s one gateway relays (synthetic worker)
    python -m loadtest report --start --peer transformers-serve   # all of the above but priority, one report

Every run writes JSON, Markdown and PNG plots to loadtest/out/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from loadtest import servers
from loadtest.long_prompts import run_long
from loadtest.memory import PeakRss
from loadtest.mixed import run_mixed
from loadtest.priority_mix import run_priority
from loadtest.report import write_report
from loadtest.servers import Server
from loadtest.stats import Summary, error_lines, table
from loadtest.workload import run_chat, run_multiturn
from shared.settings import DEFAULT_MODEL

VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "cache-on": {},
    "cache-off": {"LLMFLEET_BATCH__PREFIX_CACHE_TOKENS": "0"},
    "affinity-off": {"LLMFLEET_AFFINITY": "false"},
    # The unquantized checkpoint in float32: where the CPU lacks AVX512, dense float32 matmuls beat ATen's int4
    # kernel on batches of more than a few tokens (loadtest/RESULTS-HISTORY.md).
    "dense-fp32": {"LLMFLEET_MODELS": json.dumps({DEFAULT_MODEL: {"quantization": "none", "dtype": "float32"}})},
    # GPTQ's re-quantized model instead of the GGUF's grid, through gptqmodel's kernels.
    "gptq-grid": {"LLMFLEET_MODELS": json.dumps({DEFAULT_MODEL: {"grid": "gptq"}})},
    # The GGUF's grid through gptqmodel's ATen int4 kernel and a bf16 embedding instead of worker.block_quant's
    # kernel (on a CPU where worker.cpu_kernels builds: AVX512 or AVX2).
    "aten": {"LLMFLEET_MODELS": json.dumps({DEFAULT_MODEL: {"cpu_kernel": "aten"}})},
    "priority": {"LLMFLEET_SCHEDULING_POLICY": "priority"},
}


def _chat(server: Server, args: argparse.Namespace) -> list[Summary]:
    return [
        asyncio.run(
            run_chat(server, c, max(c * args.requests_per_user, 8), args.max_tokens, not args.no_force, args.seed)
        )
        for c in args.concurrency
    ]


def _long(server: Server, args: argparse.Namespace) -> list[Summary]:
    run = run_long(server, args.model, args.long_concurrency, args.long_requests, args.max_tokens, args.seed)
    return [asyncio.run(run)]


def _multiturn(server: Server, args: argparse.Namespace) -> list[Summary]:
    run = run_multiturn(server, args.conversations, args.multiturn_concurrency, args.turns, args.multiturn_max_tokens)
    return [asyncio.run(run)]


def _mixed(server: Server, args: argparse.Namespace) -> list[Summary]:
    run = run_mixed(
        server, args.interactive_concurrency, args.interactive_requests, args.batch, args.max_tokens,
        args.batch_max_tokens, args.seed, args.batch_timeout,
    )  # fmt: skip
    return asyncio.run(run)


def _priority(server: Server, args: argparse.Namespace) -> list[Summary]:
    run = run_priority(server, args.background_concurrency, args.urgent_requests, args.max_tokens, args.seed)
    return asyncio.run(run)


WORKLOADS: dict[str, Callable[[Server, argparse.Namespace], list[Summary]]] = {
    "chat": _chat,
    "long": _long,
    "multiturn": _multiturn,
    "mixed": _mixed,
    "priority": _priority,
}
REPORTED = ["chat", "long", "multiturn", "mixed"]
"""The workloads `report` runs (priority compares scheduling policies: `priority --start --variants default
priority`)."""


def _servers(args: argparse.Namespace, with_peers: bool = True) -> list[Callable]:
    """Factories of server context managers, llmfleet first, then each peer."""
    logs = Path(args.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if args.start:
        ours = [
            lambda v=v: servers.llmfleet(v, args.workers, VARIANTS[v], args.model, logs / f"llmfleet-{v}.log")
            for v in args.variants
        ]
    else:
        ours = [lambda: servers.running(args.url, args.model)]
    peers = [
        lambda p=p: servers.transformers_serve(p, args.model, args.peer_args, logs / f"{p}.log") for p in args.peer
    ]
    return ours + (peers if with_peers else [])


def run_workloads(args: argparse.Namespace, names: list[str]) -> list[Summary]:
    summaries: list[Summary] = []
    for server_factory in _servers(args):
        with server_factory() as server:
            for name in names:
                with PeakRss(server.serving_processes) as rss:
                    results = WORKLOADS[name](server, args)
                for summary in results:
                    summary.extra["worker_rss"] = rss.as_dict()
                    print(table([summary]).splitlines()[-1], flush=True)
                    if summary.error_reasons:
                        print(error_lines([summary]), flush=True)
                summaries += results
    return summaries


def run_overhead(args: argparse.Namespace) -> dict:
    from loadtest.overhead import InProcessEngine, bare_round_trips, client_ttfts, overhead, paired_ttfts

    with _servers(args, with_peers=False)[0]() as server:
        engine = InProcessEngine(args.model)  # beside the fleet: the two are timed alternately, request by request
        gateway, in_process = asyncio.run(
            paired_ttfts(server, engine, args.overhead_requests, args.max_tokens, args.seed)
        )
        client = asyncio.run(client_ttfts(args.model, args.overhead_requests, args.seed))  # the fleet idle
        bare = asyncio.run(bare_round_trips(args.overhead_requests))
    return overhead(gateway, in_process, client, bare)


def run_relay(args: argparse.Namespace) -> list[Summary]:
    from loadtest.relay import run_relay as relay

    return relay(args.model, args.relay_concurrency, args.requests_per_user, args.relay_max_tokens, args.relay_step_ms)


def main(argv: list[str] | None = None) -> None:
    options = argparse.ArgumentParser(add_help=False)
    add = options.add_argument
    add("--url", default="http://127.0.0.1:8000/v1", help="a running llmfleet (without --start)")
    add("--start", action="store_true", help="start a fresh local fleet for each variant")
    add("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS))
    add("--workers", type=int, default=1)
    add("--peer", nargs="*", default=[], choices=sorted(servers.PEERS), help="peers to run the same workload on")
    add("--peer-args", default="", help="extra `transformers serve` arguments, e.g. '--cb-num-blocks 1024'")
    add("--model", default=DEFAULT_MODEL)
    add("--seed", type=int, default=1234)
    add("--out", default="loadtest/out")
    add("--max-tokens", type=int, default=64, help="forced output tokens (chat, long, mixed interactive)")
    add("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="chat")
    add("--requests-per-user", type=int, default=4, help="chat and relay")
    add("--no-force", action="store_true", help="chat: let EOS end answers early")
    add("--baseline", choices=["none", "generate"], default="none", help="chat: in-process plain generate")
    add("--long-concurrency", type=int, default=8)
    add("--long-requests", type=int, default=16)
    add("--conversations", type=int, default=8)
    add("--multiturn-concurrency", type=int, default=4)
    add("--turns", type=int, default=4)
    add("--multiturn-max-tokens", type=int, default=64)
    add("--interactive-concurrency", type=int, default=4, help="mixed")
    add("--interactive-requests", type=int, default=16, help="mixed")
    add("--batch", "--batch-lines", type=int, default=32, help="mixed: batch requests all in flight at once")
    add("--batch-max-tokens", type=int, default=128)
    add("--batch-timeout", type=float, default=600, help="mixed: batch requests not done by then count as errors")
    add("--background-concurrency", type=int, default=64, help="priority: background streams (slots: 32)")
    add("--urgent-requests", type=int, default=16, help="priority: urgent requests, one at a time")
    add("--overhead-requests", type=int, default=48)
    add("--relay-concurrency", type=int, nargs="+", default=[8, 32, 128])
    add("--relay-max-tokens", type=int, default=256)
    add("--relay-step-ms", type=float, default=0.0, help="synthetic worker time per step; 0: as fast as it can")
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in [*WORKLOADS, "overhead", "relay", "report"]:
        commands.add_parser(name, parents=[options], aliases=["batch-mix"] if name == "mixed" else [])
    args = parser.parse_args(argv)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the servers this run started are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.command == "batch-mix":  # the name this workload had before it ran peers too
        args.command = "mixed"

    summaries: list[Summary] = []
    overhead = None
    if args.command in WORKLOADS:
        summaries = run_workloads(args, [args.command])
    if args.command == "report":
        summaries = run_workloads(args, REPORTED)
    if args.command in ("chat", "report") and args.baseline == "generate":
        from loadtest.generate_baseline import run_generate

        summaries += run_generate(args.model, args.concurrency, args.max_tokens, args.seed)
    if args.command in ("relay", "report"):
        summaries += run_relay(args)
    if args.command in ("overhead", "report"):
        overhead = run_overhead(args)
    meta = {
        "command": "python -m loadtest " + shlex.join(sys.argv[1:] if argv is None else argv),
        "argv": vars(args),
        "host": platform.node(),
        "cpu": cpu_model(),
    }
    path = write_report(Path(args.out), f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}", meta, summaries, overhead)
    print(path.read_text())


def cpu_model() -> str:
    """Figures are only comparable on one CPU model: every report names it (and the core count)."""
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.processor() or 'unknown CPU'}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
