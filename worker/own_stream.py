"""A worker's own request stream (keys.worker_requests): where gateways route a conversation's next turn.

Affinity is a hint, never a trap: a worker that stops hands back what waits in its own stream to the shared one,
and the own stream of a worker that died (no heartbeat for a while) is adopted the same way by any live worker."""

from __future__ import annotations

import time

import redis
import structlog

from shared import keys
from shared.protocol import LIVE_WINDOW_S

log = structlog.get_logger(__name__)

ADOPT_LOCK_S = 30
HANDED_BACK = "handed_back"
"""Field on a re-queued entry: how many times it was handed back. The worker that reads it resumes it from its
output stream (it may have streamed part of its answer) and counts the hand-backs as deliveries."""


def move_to_shared(client: redis.Redis, model: str, worker_id: str, keep: frozenset[str] = frozenset()) -> int:
    """Re-queue the entries of `worker_id`'s own stream on the shared stream (the 0 lane: an own stream holds
    priority 0's requests only), except those in `keep` (requests the worker is still finishing). Returns how many
    moved."""
    own = keys.worker_requests(model, worker_id)
    moving = [(entry_id, fields) for entry_id, fields in client.xrange(own) if entry_id not in keep]
    if moving:
        pipe = client.pipeline(transaction=True)
        for entry_id, fields in moving:
            pipe.xadd(keys.requests(model), {**fields, HANDED_BACK: str(int(fields.get(HANDED_BACK, 0)) + 1)})
            pipe.xdel(own, entry_id)
        pipe.execute()
    return len(moving)


def adopt_orphans(client: redis.Redis, model: str) -> None:
    """Move the own streams of workers whose heartbeat went stale onto the shared stream (once, under a lock)."""
    stale = client.zrangebyscore(keys.live_workers(model), "-inf", time.time() - 2 * LIVE_WINDOW_S)
    for worker_id in stale:
        if not client.set(keys.adoption_lock(model, worker_id), "1", nx=True, ex=ADOPT_LOCK_S):
            continue
        moved = move_to_shared(client, model, worker_id)
        client.delete(keys.worker_requests(model, worker_id))
        client.zrem(keys.live_workers(model), worker_id)
        client.hdel(keys.load(model), worker_id)
        if moved:
            log.warning("worker.adopted_orphaned_requests", dead_worker=worker_id, moved=moved)
