"""How many refused requests per second one gateway answers, on the auth-failure and rate-limit paths.

    python -m loadtest.rejections --url http://127.0.0.1:8000 --seconds 10 --concurrency 32

Needs a gateway in `keys` mode and its Redis (LLMFLEET_REDIS_URL); no worker. It creates one key with rpm=1,
spends its one request of the minute, then sends (1) requests with a wrong key and (2) requests with the spent
key, each for `--seconds`, and prints the rate of 401s and of 429s.
Loopback only: the client shares the machine's cores."""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx
import redis.asyncio as aioredis

from gateway.api_keys import ApiKeys
from gateway.rate_limits import RateLimiter
from shared.settings import DEFAULT_MODEL, Settings

BODY = {"model": DEFAULT_MODEL, "prompt": "Hello", "max_tokens": 1}


async def hammer(url: str, headers: dict[str, str], seconds: float, concurrency: int, expected: int) -> tuple[int, int]:
    """(answers with the expected status, other answers) within `seconds`."""
    counts = [0, 0]
    stop = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as client:

        async def loop() -> None:
            while time.perf_counter() < stop:
                reply = await client.post("/v1/completions", json=BODY)
                counts[reply.status_code != expected] += 1

        await asyncio.gather(*(loop() for _ in range(concurrency)))
    return counts[0], counts[1]


async def main(args: argparse.Namespace) -> None:
    client = aioredis.Redis.from_url(Settings().redis_url, decode_responses=True)
    key, secret = await ApiKeys(client).create("rejections-loadtest", rpm=1, tpm=1_000_000, max_concurrency=1000)
    await RateLimiter(client, lease_s=60).admit(key, "spend-the-minute", 1, hold_slot=False)
    await client.aclose()
    spent = {"Authorization": f"Bearer {secret}"}
    paths = [("auth failure (401)", {"Authorization": "Bearer llmf-000000000000-wrong"}, 401),
             ("rate limit (429)", spent, 429)]  # fmt: skip
    for name, headers, status in paths:
        ok, other = await hammer(args.url, headers, args.seconds, args.concurrency, status)
        print(f"{name}: {ok / args.seconds:.0f} rejections/s over {args.seconds:.0f} s, {other} other answers")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m loadtest.rejections")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    asyncio.run(main(parser.parse_args()))
