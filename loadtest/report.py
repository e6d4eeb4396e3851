"""One benchmark's outputs in loadtest/out/: STEM.json (every figure), STEM.md (tables, the targets met and
missed, ratios against the peer, the workload-specific figures) and STEM-*.png."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest.plots import write_plots
from loadtest.stats import Summary, error_lines, ratio_table, table
from loadtest.targets import targets_table


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _turn_cells(summary: Summary) -> list[str]:
    shares = summary.extra.get("cached_share_by_turn") or [None] * len(summary.extra["ttft_p50_by_turn"])
    return [
        _ms(ttft) + ("" if share is None else f" ({share:.0%})")
        for ttft, share in zip(summary.extra["ttft_p50_by_turn"], shares)
    ]


def _sections(summaries: list[Summary], overhead: dict | None) -> list[str]:
    judged = targets_table(summaries, overhead)
    parts = ["## Against issue 8's targets", judged] if judged else []
    if summaries:
        parts += ["## All runs", table(summaries)]
    errors = error_lines(summaries)
    if errors:
        parts += ["## Errors", errors]
    ratios = ratio_table(summaries)
    if ratios:
        parts += ["## llmfleet / peer", ratios]
    multiturn = [s for s in summaries if s.workload == "multiturn"]
    if multiturn:
        turns = len(multiturn[0].extra["ttft_p50_by_turn"])
        head = "| run | " + " | ".join(f"turn {i + 1} TTFT p50 ms" for i in range(turns)) + " |"
        rows = [f"| {s.label} | " + " | ".join(_turn_cells(s)) + " |" for s in multiturn]
        note = "In brackets: the share of that turn's prompt tokens the server reused from its prefix cache."
        parts += ["## Multi-turn", note, "\n".join([head, "|---" * (turns + 1) + "|", *rows])]
    long = [s for s in summaries if s.workload == "long"]
    if long:
        rows = [
            f"| {s.label} | {s.concurrency} | {s.output_tok_s:.0f} | {_ms(s.ttft['p50'])} | "
            + "/".join(_ms(s.extra["itl_during_long_prefill"][q]) for q in ("p50", "p99"))
            + " |"
            for s in long
        ]
        head = "| run | c | out tok/s | TTFT p50 ms | ITL of running streams during a 1.5k prefill p50/p99 ms |"
        parts += ["## Long prompts", f"Prompt tokens: {long[0].extra['prompt_tokens']}."]
        parts += ["\n".join([head, "|---" * 5 + "|", *rows])]
    batch = [s for s in summaries if s.workload == "mixed batch"]
    if batch:
        parts += ["## Mixed", "Batch load sent as: " + "; ".join(f"{s.label}: {s.extra['batch_via']}" for s in batch)]
    relay = [s for s in summaries if s.workload == "relay"]
    if relay:
        columns = ["c", "relayed tok/s", "gateway CPU (cores)", "relayed tok/s per gateway core", "client CPU (cores)"]
        head = "| " + " | ".join([*columns, "gateway RSS MiB", "errors"]) + " |\n" + "|---" * 7 + "|"
        rows = [
            f"| {s.concurrency} | {s.output_tok_s:.0f} | {s.extra['gateway_cpu_share']} | "
            f"{s.output_tok_s / max(s.extra['gateway_cpu_share'], 0.01):.0f} | {s.extra['client_cpu_share']} | "
            f"{s.extra['gateway_rss_mib']} | {s.errors} |"
            for s in relay
        ]
        note = (
            "A process near 1.0 core is the bottleneck; the gateway is one event loop, so one core is its ceiling and "
            "tok/s per gateway core estimates what it would relay there."
        )
        parts += ["## Gateway relay capacity (synthetic worker)", note, "\n".join([head, *rows])]
    if overhead:
        parts += [
            "## Gateway + Redis overhead, concurrency 1",
            f"TTFT p50 through the gateway {_ms(overhead['gateway_ttft']['p50'])} ms, engine in-process "
            f"{_ms(overhead['engine_ttft']['p50'])} ms (timed alternately, prompt by prompt): overhead, the p50 of "
            f"each prompt's difference, {_ms(overhead['overhead_p50_s'])} ms. Of this, the streaming openai "
            f"client's own work (create() to the first content chunk against a canned response, no server): "
            f"{_ms(overhead['client_own_p50_s'])} ms p50. For scale, this machine's floor: an HTTP round trip to "
            f"a bare ASGI app (`loadtest.bare_server`, uvicorn, no route, no Redis) takes "
            f"{_ms(overhead['bare_round_trip_p50_s']['after_pause'])} ms p50 after the same pause, "
            f"{_ms(overhead['bare_round_trip_p50_s']['back_to_back'])} ms back to back.",
        ]
    rss = [s for s in summaries if s.extra.get("worker_rss", {}).get("peak_rss_mib") is not None]
    if rss:
        rows = [
            f"| {s.workload} | {s.label} | {s.concurrency} | {s.extra['worker_rss']['peak_rss_mib']} |" for s in rss
        ]
        parts += ["## Peak worker RSS", "\n".join(["| workload | run | c | MiB |\n|---|---|---|---|", *rows])]
    return parts


def write_report(out: Path, stem: str, meta: dict, summaries: list[Summary], overhead: dict | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    body = {"meta": meta, "runs": [s.as_dict() for s in summaries], "overhead": overhead}
    (out / f"{stem}.json").write_text(json.dumps(body, indent=2))
    plots = write_plots(summaries, out, stem)
    text = [f"# loadtest {stem}", f"`{meta['command']}` on {meta.get('cpu', 'an unnamed CPU')}"]
    text += _sections(summaries, overhead)
    text += [f"![{p.stem}]({p.name})" for p in plots]
    path = out / f"{stem}.md"
    path.write_text("\n\n".join(text) + "\n")
    return path
