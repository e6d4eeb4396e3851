"""The gateway's Prometheus side: counts every answered API request by model, status and key name (an ASGI
middleware, so it sees the final status of streamed responses and of requests refused before any route), and
reads the queue gauges from Redis when /metrics is scraped. The metrics themselves are in shared.metrics."""

from __future__ import annotations

import structlog
from prometheus_client import generate_latest
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.http_guards import keyed
from gateway.queue_client import QueueClient
from shared import metrics
from shared.settings import Settings

log = structlog.get_logger(__name__)


class RequestCounter:
    """Counts POST requests on the keyed paths (gateway.http_guards) once their response has been sent; reads the
    labels from request.state (`model_name` set by gateway.serving, `key_name` set by API-key auth, absent in open
    mode)."""

    def __init__(self, app: ASGIApp):
        self.app = app
        metrics.RATE_LIMIT_REJECTIONS.labels("")  # exported at 0 from the start, as open mode never refuses

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not keyed(scope["path"]):
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            state = scope.get("state") or {}
            key_name = state.get("key_name") or ""
            metrics.REQUESTS.labels(state.get("model_name") or "", str(status), key_name).inc()
            if status == 429:
                metrics.RATE_LIMIT_REJECTIONS.labels(key_name).inc()


async def render(settings: Settings, queue: QueueClient) -> bytes:
    try:
        for model in settings.models:
            depth, pending, lag = await queue.stream_stats(model)
            metrics.QUEUE_DEPTH.labels(model).set(depth)
            metrics.QUEUE_PENDING.labels(model).set(pending)
            metrics.QUEUE_LAG.labels(model).set(lag)
            metrics.LIVE_WORKERS.labels(model).set(await queue.live_workers(model))
            for outcome in ("hit", "unknown", "unavailable"):  # exported at 0 before the first routed request
                metrics.AFFINITY_ROUTES.labels(model, outcome)
    except RedisError as error:
        # Still answer the scrape: the request counters are ours, not Redis's.
        log.warning("metrics.queue_unavailable", error=str(error))
    return generate_latest(metrics.GATEWAY)
