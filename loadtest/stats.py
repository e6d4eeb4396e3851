"""What one benchmark run measured, and how it is summarised: TTFT, inter-token latency and end-to-end latency
percentiles, output tokens/s, requests/s, errors."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field


@dataclass
class RequestTrace:
    started: float
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    ended: float = 0.0
    completion_tokens: int = 0
    text: str = ""
    error: str | None = None


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

    def as_dict(self) -> dict:
        return asdict(self)


def _pcts(values: list[float]) -> dict[str, float | None]:
    return {f"p{q}": percentile(values, q) for q in (50, 95, 99)}


def summarise(label: str, concurrency: int, traces: list[RequestTrace], wall_s: float) -> Summary:
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
        ttft=_pcts([t.first_token - t.started for t in ok if t.first_token is not None]),
        itl=_pcts(itl),
        e2e=_pcts([t.ended - t.started for t in ok]),
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def table(summaries: list[Summary]) -> str:
    head = (
        "| run | c | req | err | out tok/s | req/s | TTFT p50/p95/p99 ms | ITL p50/p95/p99 ms | E2E p50/p95/p99 ms |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    rows = [
        f"| {s.label} | {s.concurrency} | {s.requests} | {s.errors} | {s.output_tok_s:.0f} | {s.req_s:.2f} | "
        + " | ".join("/".join(_ms(d[k]) for k in ("p50", "p95", "p99")) for d in (s.ttft, s.itl, s.e2e))
        + " |"
        for s in summaries
    ]
    return "\n".join([head, *rows])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0
