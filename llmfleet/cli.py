"""The `llmfleet` command: `up` runs the service on this machine, `keys` manages API keys in its Redis."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
from pathlib import Path

from shared.settings import Settings


def _up(args: argparse.Namespace) -> int:
    from llmfleet.supervisor import Supervisor

    return Supervisor(Settings(), workers=args.workers, state_dir=Path(args.state_dir), auth=args.auth).run()


def _keys(args: argparse.Namespace) -> int:
    import redis.asyncio as aioredis

    from gateway.api_keys import ApiKeys

    async def run() -> int:
        client = aioredis.Redis.from_url(Settings().redis_url, decode_responses=True)
        try:
            store = ApiKeys(client)
            if args.action == "create":
                key, secret = await store.create(args.name, args.rpm, args.tpm, args.max_concurrency, args.admin)
                if args.json:
                    print(json.dumps({**key.model_dump(), "key": secret}))
                else:
                    print(f"created key {key.id} ({key.name}); it is shown only this once:\n{secret}")
                return 0
            if args.action == "list":
                found = await store.list()
                if args.json:
                    print(json.dumps([k.model_dump() for k in found]))
                for key in [] if args.json else found:
                    state = f"revoked {_when(key.revoked)}" if key.revoked else "active"
                    print(f"{key.id}  {key.name:<20} rpm={key.rpm} tpm={key.tpm} "
                          f"concurrency={key.max_concurrency}{'  admin' if key.admin else ''}  "
                          f"created {_when(key.created)}  {state}")  # fmt: skip
                return 0
            revoked = await store.revoke(args.id)
            if revoked is None:
                print(f"no key with id {args.id}")
                return 1
            print(f"revoked key {revoked.id} ({revoked.name})")
            return 0
        finally:
            await client.aclose()

    return asyncio.run(run())


def _when(timestamp: float | None) -> str:
    return datetime.datetime.fromtimestamp(timestamp or 0, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


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
    up.add_argument(
        "--auth", choices=["open", "keys"], default="open",
        help="open (default here, for local development): no API keys; keys: require `llmfleet keys` keys",
    )  # fmt: skip
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

    keys = commands.add_parser("keys", help="create, list and revoke API keys (in the Redis of LLMFLEET_REDIS_URL)")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key and print it, once")
    create.add_argument("--name", required=True)
    create.add_argument("--rpm", type=int, default=60, help="requests per minute")
    create.add_argument("--tpm", type=int, default=100_000, help="tokens (prompt + output) per minute")
    create.add_argument("--max-concurrency", type=int, default=8, help="requests in flight at once")
    create.add_argument("--admin", action="store_true", help="may load and unload LoRA adapters at runtime")
    create.add_argument("--json", action="store_true")
    listing = actions.add_parser("list", help="every key, without secrets")
    listing.add_argument("--json", action="store_true")
    revoke = actions.add_parser("revoke", help="refuse a key from now on")
    revoke.add_argument("id")
    keys.set_defaults(func=_keys)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
