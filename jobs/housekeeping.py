"""The arq cron jobs: restart batch runs that died, and trim what nobody can use any more from the streams.
Expiry of results and records is Redis's own (every key written with a TTL); these cover what a TTL cannot."""

from __future__ import annotations

import time

import structlog

from gateway.errors import APIError
from jobs.enqueue import enqueue_batch_run
from jobs.store import TERMINAL
from shared import keys

log = structlog.get_logger(__name__)

STREAM_TRIM_MARGIN_S = 60


async def reclaim_batches(ctx: dict) -> int:
    """Starts a run for every unfinished batch whose runner holds no lease (it died, or never started)."""
    store = ctx["store"]
    started = 0
    for batch_id in await store.active():
        try:
            state = await store.batch(batch_id, check_owner=False)
        except APIError:  # the record expired: nothing left to run
            await store.forget(batch_id)
            continue
        if state.status in TERMINAL:
            await store.forget(batch_id)
        elif not await store.lease_held(batch_id):
            await enqueue_batch_run(ctx["redis"], batch_id, state.attempt)
            started += 1
    return started


async def trim_streams(ctx: dict) -> int:
    """Drops stream entries older than any deadline they could carry: they would only end `expired`."""
    settings = ctx["settings"]
    client = ctx["client"]
    now = time.time()
    trimmed = 0
    for model in settings.models:
        lanes = keys.ordered_lanes(model, await client.zrange(keys.lanes(model), 0, -1, withscores=True))
        for stream, max_age_s in [
            *((lane, settings.request_timeout_s) for lane in lanes),
            (keys.batch_requests(model), settings.jobs.batch_window_s),
        ]:
            min_id = int((now - max_age_s - STREAM_TRIM_MARGIN_S) * 1000)
            trimmed += await client.xtrim(stream, minid=min_id, approximate=True)
    if trimmed:
        log.info("streams.trimmed", entries=trimmed)
    return trimmed
