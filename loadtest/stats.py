"""What one benchmark run measured, and how it is summarised: TTFT, inter-token latency and end-to-end latency
percentiles, output tokens/s, requests/s, errors."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class RequestTrace:
    started: float
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    ended: float = 0.0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int | None = None
    """Prompt tokens the server says it reused from its prefix cache, when it says."""
    text: str = ""
    error: str | None = None
    prompt_index: int = -1
    """Which of the workload's prompts it ran."""


def failure_reason(error: BaseException) -> str:
    """Why a request failed, as its run lists it: the error's type and message, then each cause under it, where the
    error alone may say nothing (a connection reset: `ReadError:  <- ReadError:  <- BrokenResourceError: `)."""
    reasons = []
    cause: BaseException | None = error
    while cause is not None:
        reasons.append(f"{type(cause).__name__}: {cause}")
        cause = cause.__cause__
    return " <- ".join(reasons)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Summary:
    label: str
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    output_tokens: int
    output_tok_s: float
    req_s: float
    ttft: dict[str, float | None]
    itl: dict[str, float | None]
    e2e: dict[str, float | None]
    workload: str = "chat"
    peer: bool = False
    """True for a peer server (the denominator of every ratio)."""
    extra: dict = field(default_factory=dict)
    """Workload-specific figures (e.g. ITL during long prefills) and the server's worker RSS."""
    error_reasons: dict[str, int] = field(default_factory=dict)
    """Each error the client saw, and how many requests ended with it."""

    def as_dict(self) -> dict:
        return asdict(self)


def pcts(values: list[float]) -> dict[str, float | None]:
    return {f"p{q}": percentile(values, q) for q in (50, 95, 99)}


def summarise(
    label: str, concurrency: int, traces: list[RequestTrace], wall_s: float, workload: str = "chat", peer: bool = False
) -> Summary:
    ok = [t for t in traces if t.error is None]
    itl = [b - a for t in ok for a, b in zip(t.token_times, t.token_times[1:])]
    tokens = sum(t.completion_tokens for t in ok)
    return Summary(
        label=label,
        concurrency=concurrency,
        requests=len(traces),
        errors=len(traces) - len(ok),
        wall_s=wall_s,
        output_tokens=tokens,
        output_tok_s=tokens / wall_s if wall_s else 0.0,
        req_s=len(ok) / wall_s if wall_s else 0.0,
        ttft=pcts([t.first_token - t.started for t in ok if t.first_token is not None]),
        itl=pcts(itl),
        e2e=pcts([t.ended - t.started for t in ok]),
        workload=workload,
        peer=peer,
        error_reasons=dict(Counter(t.error for t in traces if t.error is not None).most_common()),
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def table(summaries: list[Summary]) -> str:
    head = (
        "| workload | run | c | req | err | out tok/s | req/s | TTFT p50/p95/p99 ms | ITL p50/p95/p99 ms "
        "| E2E p50/p95/p99 ms |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [
        f"| {s.workload} | {s.label} | {s.concurrency} | {s.requests} | {s.errors} | {s.output_tok_s:.0f} "
        f"| {s.req_s:.2f} | "
        + " | ".join("/".join(_ms(d[k]) for k in ("p50", "p95", "p99")) for d in (s.ttft, s.itl, s.e2e))
        + " |"
        for s in summaries
    ]
    return "\n".join([head, *rows])


def error_lines(summaries: list[Summary]) -> str:
    """Why requests failed, run by run ("" when none did)."""
    return "\n".join(
        f"- {s.workload}, {s.label}, c={s.concurrency}: {count} x {reason}"
        for s in summaries
        for reason, count in s.error_reasons.items()
    )


def _ratio(ours: float | None, peer: float | None) -> str:
    return "-" if not ours or not peer else f"{ours / peer:.2f}"


def ratio_table(summaries: list[Summary]) -> str:
    """llmfleet / peer for every llmfleet row that has a peer row with the same workload and concurrency.
    Throughput ratios above 1 and latency ratios below 1 favour llmfleet."""
    peers = [s for s in summaries if s.peer]
    head = (
        "| workload | run | peer | c | tok/s ratio | req/s ratio | TTFT p50 ratio | TTFT p95 ratio | ITL p99 ratio "
        "| E2E p50 ratio |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [
        f"| {s.workload} | {s.label} | {p.label} | {s.concurrency} | {_ratio(s.output_tok_s, p.output_tok_s)} | "
        f"{_ratio(s.req_s, p.req_s)} | {_ratio(s.ttft['p50'], p.ttft['p50'])} | "
        f"{_ratio(s.ttft['p95'], p.ttft['p95'])} | "
        f"{_ratio(s.itl['p99'], p.itl['p99'])} | {_ratio(s.e2e['p50'], p.e2e['p50'])} |"
        for s in summaries
        if not s.peer
        for p in peers
        if (p.workload, p.concurrency) == (s.workload, s.concurrency)
    ]
    return "\n".join([head, *rows]) if rows else ""


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0
