"""Issue 8's targets against what one report measured: each target's goal, the figure, and whether it was met.

Quantization fidelity is measured apart (`python -m loadtest.fidelity`); a report says so in its row."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from loadtest.stats import Summary

MULTI_TURN_VLLM_MS = (150, 184, 149)
"""vLLM-CPU's multi-turn TTFT p50, turns 2-4, on this machine kind (the issue's reference table)."""


@dataclass(frozen=True)
class Target:
    name: str
    goal: str
    measure: Callable[[list[Summary], dict | None], tuple[str, bool] | None]
    """(the figure as shown, met) from a report's runs and overhead; None where the report did not measure it."""
    words: tuple[str, str] = ("met", "missed")


def _ours(summaries: list[Summary], workload: str, concurrency: int | None = None) -> Summary | None:
    """The first llmfleet run of the workload (at the concurrency)."""
    return next(
        (s for s in summaries if not s.peer and s.workload == workload and concurrency in (None, s.concurrency)),
        None,
    )


def _peer_note(summaries: list[Summary], ours: Summary) -> str:
    peer = next(
        (s for s in summaries if s.peer and (s.workload, s.concurrency) == (ours.workload, ours.concurrency)), None
    )
    return (
        ""
        if peer is None or not peer.output_tok_s
        else f" (peer {peer.output_tok_s:.0f}: {ours.output_tok_s / peer.output_tok_s:.2f}x)"
    )


def _throughput(workload: str, concurrency: int, floor: float):
    def measure(summaries: list[Summary], _) -> tuple[str, bool] | None:
        run = _ours(summaries, workload, concurrency)
        if run is None:
            return None
        return f"{run.output_tok_s:.0f}{_peer_note(summaries, run)}", run.output_tok_s >= floor and not run.errors

    return measure


def _latency_s(workload: str, concurrency: int, read: Callable[[Summary], float | None], ceiling_s: float):
    def measure(summaries: list[Summary], _) -> tuple[str, bool] | None:
        run = _ours(summaries, workload, concurrency)
        value = None if run is None else read(run)
        return None if value is None else (f"{value * 1000:.0f} ms", value <= ceiling_s)

    return measure


def _overhead(_, overhead: dict | None) -> tuple[str, bool] | None:
    if not overhead:
        return None
    value, floor = overhead["overhead_p50_s"], overhead["bare_round_trip_p50_s"]["after_pause"]
    return f"{value * 1000:.1f} ms (a bare uvicorn round trip {floor * 1000:.1f} ms)", value <= 0.005


def _relay(summaries: list[Summary], _) -> tuple[str, bool] | None:
    runs = [s for s in summaries if s.workload == "relay"]
    if not runs:
        return None
    shown = " / ".join(f"{s.output_tok_s:,.0f}" for s in runs) + " at c=" + " / ".join(str(s.concurrency) for s in runs)
    errors = sum(s.errors for s in runs)
    return f"{shown}; {errors} errors", min(s.output_tok_s for s in runs) >= 5000 and not errors


def _memory(summaries: list[Summary], _) -> tuple[str, bool] | None:
    ours = [s for s in summaries if not s.peer and s.workload != "relay"]
    peaks = [s.extra.get("worker_rss", {}).get("peak_rss_mib") for s in ours]
    if not ours or None in peaks:
        return None
    errors = sum(s.errors for s in ours)
    return f"worker peak RSS {max(peaks):,.0f} MiB; {errors} requests failed", not errors


def _multi_turn(summaries: list[Summary], _) -> tuple[str, bool] | None:
    run = _ours(summaries, "multiturn")
    if run is None:
        return None
    turns = run.extra["ttft_p50_by_turn"]
    later = turns[1 : 1 + len(MULTI_TURN_VLLM_MS)]
    shown = " / ".join(f"{t * 1000:.0f}" for t in later) + f" ms (turn 1 {turns[0] * 1000:.0f})"
    return shown, all(t * 1000 <= ref for t, ref in zip(later, MULTI_TURN_VLLM_MS))


TARGETS = [
    Target("chat c=32", "≥ 572 tok/s", _throughput("chat", 32, 572)),
    Target("chat c=1", "≥ 78 tok/s", _throughput("chat", 1, 78)),
    Target("TTFT p95 at c=32", "≤ 0.5 s", _latency_s("chat", 32, lambda s: s.ttft["p95"], 0.5)),
    Target("long prompts, throughput", "≥ 110 tok/s", _throughput("long", 8, 110)),
    Target("long prompts, TTFT p50", "≤ 1.2 s", _latency_s("long", 8, lambda s: s.ttft["p50"], 1.2)),
    Target(
        "ITL p99 of running streams during a 1.5k prefill",
        "< 0.5 s",
        _latency_s("long", 8, lambda s: s.extra["itl_during_long_prefill"]["p99"], 0.5),
    ),  # fmt: skip
    Target("multi-turn TTFT p50, turns 2-4", "(vLLM's 150 / 184 / 149 ms)", _multi_turn, ("ahead", "behind")),
    Target("gateway + Redis overhead, c=1", "≤ 5 ms", _overhead),
    Target("one gateway's relay", "≥ 5,000 tok/s", _relay),
    Target("memory", "RSS reported, no OOM", _memory),
]


def targets_table(summaries: list[Summary], overhead: dict | None) -> str:
    """The targets this report measured, as a Markdown table; "" if it measured none."""
    rows = []
    for target in TARGETS:
        measured = target.measure(summaries, overhead)
        if measured is not None:
            shown, met = measured
            rows.append(f"| {target.name} | {target.goal} | {shown} | {target.words[0 if met else 1]} |")
    if not rows:
        return ""
    rows.append(
        "| perplexity, probe answers, weight memory | within 3% / ≥ 18 of 20 / ≤ 0.35 of bf16 | "
        "`python -m loadtest.fidelity` | not in this report |"
    )
    return "\n".join(["| target | goal | measured | status |", "|---|---|---|---|", *rows])
