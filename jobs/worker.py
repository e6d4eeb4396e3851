"""The arq worker of the job layer: runs batches (jobs.batch_runner) and the housekeeping crons.

arq's guarantee is at-least-once (a job may run more than once); a batch run is safe to repeat because every
line is dispatched and recorded at most once in Redis, and only the holder of the batch's lease runs it."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from arq import cron
from arq.connections import RedisSettings
from arq.worker import Worker, func

from gateway.prompts import Tokenizers
from gateway.queue_client import QueueClient
from gateway.serving import Completions
from jobs import housekeeping
from jobs.batch_runner import run_batch
from jobs.enqueue import RUN_BATCH
from jobs.store import BatchStore
from shared import keys
from shared.settings import Settings

RECLAIM_EVERY_S = 3
HEALTH_CHECK_INTERVAL_S = 10


async def _run_batch(ctx: dict, batch_id: str) -> str:
    return await run_batch(ctx["settings"], ctx["store"], ctx["completions"], batch_id)


def build_worker(settings: Settings, max_jobs: int = 10) -> Worker:
    async def startup(ctx: dict) -> None:
        client = aioredis.Redis.from_url(settings.redis_url, decode_responses=True, health_check_interval=30)
        ctx["settings"] = settings
        ctx["client"] = client
        ctx["store"] = BatchStore(client)
        tokenizers = Tokenizers(settings)
        # Loaded now, not inside a batch run, where a slow first load would stall its lease refresh.
        await asyncio.to_thread(tokenizers.load_prepared)
        ctx["completions"] = Completions(settings, QueueClient(client, settings), tokenizers)

    async def shutdown(ctx: dict) -> None:
        await ctx["client"].aclose()

    return Worker(
        functions=[func(_run_batch, name=RUN_BATCH, timeout=settings.jobs.batch_window_s + 60, max_tries=1)],
        cron_jobs=[
            cron(housekeeping.reclaim_batches, second=set(range(0, 60, RECLAIM_EVERY_S)), run_at_startup=True),
            cron(housekeeping.trim_streams, second={30}),
        ],
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        queue_name=keys.ARQ_QUEUE,
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
        on_startup=startup,
        on_shutdown=shutdown,
        max_jobs=max_jobs,
        keep_result=3600,
    )
