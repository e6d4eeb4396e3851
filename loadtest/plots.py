"""PNG plots of a report: latency percentiles and throughput against concurrency (chat), TTFT per turn
(multiturn), one line per server."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from loadtest.stats import Summary  # noqa: E402


def _by_server(summaries: list[Summary], workload: str) -> dict[str, list[Summary]]:
    lines: dict[str, list[Summary]] = {}
    for s in summaries:
        if s.workload == workload:
            lines.setdefault(s.label, []).append(s)
    return {label: sorted(runs, key=lambda s: s.concurrency) for label, runs in lines.items()}


def write_plots(summaries: list[Summary], out: Path, stem: str) -> list[Path]:
    written = []
    chat = _by_server(summaries, "chat")
    if chat:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for ax, metric in zip(axes, ("ttft", "itl", "e2e")):
            for label, runs in chat.items():
                xs = [s.concurrency for s in runs]
                for q, style in (("p50", "-"), ("p99", "--")):
                    ys = [(getattr(s, metric)[q] or float("nan")) * 1000 for s in runs]
                    ax.plot(xs, ys, style, marker="o", label=f"{label} {q}")
            ax.set(xscale="log", xlabel="concurrency", ylabel="ms", title=f"chat {metric.upper()}")
            ax.set_xticks(xs, [str(x) for x in xs])
        axes[0].legend(fontsize=7)
        written.append(_save(fig, out / f"{stem}-latency.png"))
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, runs in chat.items():
            ax.plot([s.concurrency for s in runs], [s.output_tok_s for s in runs], marker="o", label=label)
        ax.set(xscale="log", xlabel="concurrency", ylabel="output tokens/s", title="chat throughput")
        ax.legend(fontsize=7)
        written.append(_save(fig, out / f"{stem}-throughput.png"))
    multiturn = [s for s in summaries if s.workload == "multiturn"]
    if multiturn:
        fig, ax = plt.subplots(figsize=(6, 4))
        for s in multiturn:
            per_turn = s.extra["ttft_p50_by_turn"]
            ys = [float("nan") if v is None else v * 1000 for v in per_turn]
            ax.plot(range(1, len(ys) + 1), ys, marker="o", label=s.label)
        ax.set(xlabel="turn", ylabel="TTFT p50 ms", title="multi-turn TTFT per turn")
        ax.legend(fontsize=7)
        written.append(_save(fig, out / f"{stem}-ttft-per-turn.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
