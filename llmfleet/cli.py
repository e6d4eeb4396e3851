"""The `llmfleet` command."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from shared.settings import Settings


def _up(args: argparse.Namespace) -> int:
    from llmfleet.supervisor import Supervisor

    return Supervisor(Settings(), workers=args.workers, state_dir=Path(args.state_dir)).run()


def _base_url(args: argparse.Namespace) -> str:
    settings = Settings()
    return args.url or f"http://{settings.gateway_host}:{settings.gateway_port}/v1"


def _batch_submit(args: argparse.Namespace) -> int:
    import openai

    from llmfleet.job_client import submit_batch

    client = openai.OpenAI(base_url=_base_url(args), api_key=args.api_key, max_retries=2)
    output = Path(args.output) if args.output else None
    return submit_batch(client, Path(args.file), args.endpoint, args.wait, output)


def _jobs_get(args: argparse.Namespace) -> int:
    from llmfleet.job_client import print_job

    return print_job(_base_url(args), args.api_key, args.id)


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help="the gateway's /v1 URL (default: from settings)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "unused"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmfleet")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="run Redis, the gateway, workers and the job layer on this machine")
    up.add_argument("--workers", type=int, default=1, help="workers per model")
    up.add_argument("--state-dir", default=".run", help="where the owned Redis keeps its data")
    up.set_defaults(func=_up)

    batch = commands.add_parser("batch", help="OpenAI-style batches").add_subparsers(dest="action", required=True)
    submit = batch.add_parser("submit", help="upload a JSONL of requests and create a batch")
    submit.add_argument("file", help="JSONL: one {custom_id, method, url, body} per line")
    submit.add_argument(
        "--endpoint", default="/v1/chat/completions", choices=["/v1/chat/completions", "/v1/completions"]
    )
    submit.add_argument("--wait", action="store_true", help="show progress until it ends, then write the results")
    submit.add_argument("--output", default=None, help="results file (default: FILE's name + .results.jsonl)")
    _client_options(submit)
    submit.set_defaults(func=_batch_submit)

    jobs = commands.add_parser("jobs", help="async jobs").add_subparsers(dest="action", required=True)
    get = jobs.add_parser("get", help="print one job")
    get.add_argument("id")
    _client_options(get)
    get.set_defaults(func=_jobs_get)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
