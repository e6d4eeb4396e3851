"""Starting a batch run on the arq queue (keys.ARQ_QUEUE), from the gateway or the reclaim cron."""

from __future__ import annotations

from arq.connections import ArqRedis, RedisSettings, create_pool

from shared import keys
from shared.settings import Settings

RUN_BATCH = "run_batch"


async def arq_pool(settings: Settings) -> ArqRedis:
    return await create_pool(RedisSettings.from_dsn(settings.redis_url), default_queue_name=keys.ARQ_QUEUE)


async def enqueue_batch_run(pool: ArqRedis, batch_id: str, attempt: int) -> None:
    # One arq job id per attempt: arq refuses a second job with the same id, so the reclaim cron can ask again
    # and again without starting duplicates, and a run that died (which counted its attempt) gets a new one.
    await pool.enqueue_job(RUN_BATCH, batch_id, _job_id=f"batch:{batch_id}:{attempt}", _queue_name=keys.ARQ_QUEUE)
