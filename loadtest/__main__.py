"""python -m loadtest: benchmark a running llmfleet (scripts/start) at several concurrencies, optionally next
to transformers' plain generate in-process, and write JSON plus a Markdown table.

    python -m loadtest --url http://127.0.0.1:8000/v1 --concurrency 1 8 32 --baseline generate
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

from loadtest.stats import table
from loadtest.workload import run_chat
from shared.settings import DEFAULT_MODEL


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest")
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-user", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--no-force", action="store_true", help="let EOS end answers early")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--baseline", choices=["none", "generate"], default="none")
    parser.add_argument("--out", default="loadtest/out")
    args = parser.parse_args(argv)

    summaries = []
    for c in args.concurrency:
        summary = asyncio.run(
            run_chat(
                args.url,
                args.model,
                c,
                max(c * args.requests_per_user, 8),
                args.max_tokens,
                not args.no_force,
                args.seed,
                "llmfleet (gateway→redis→worker)",
            )  # fmt: skip
        )
        summaries.append(summary)
        print(table([summary]).splitlines()[-1], flush=True)
    if args.baseline == "generate":
        from loadtest.generate_baseline import run_generate

        summaries += run_generate(args.model, args.concurrency, args.max_tokens, args.seed)
    report = table(summaries)
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {"argv": vars(args), "host": platform.node(), "python": platform.python_version()}
    (out / f"chat-{stamp}.json").write_text(
        json.dumps({"meta": meta, "runs": [s.as_dict() for s in summaries]}, indent=2)
    )
    (out / f"chat-{stamp}.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
