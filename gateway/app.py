"""The gateway application: create_app(settings) for tests and embedding, main() for `python -m gateway`."""

from __future__ import annotations

import argparse
import asyncio
import time
from contextlib import asynccontextmanager

import structlog
import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from gateway import errors
from gateway.api_keys import ApiKeys
from gateway.api_router import router
from gateway.batches import UPLOAD_ENVELOPE_BYTES, UPLOAD_PATH, Batches
from gateway.http_guards import Authentication, BodyLimit, SecurityHeaders
from gateway.jobs import Jobs
from gateway.metrics import RequestCounter
from gateway.prompts import Tokenizers
from gateway.queue_client import GRACE_AFTER_DEADLINE_S, QueueClient, connect
from gateway.rate_limits import RateLimiter
from gateway.serving import Completions
from jobs.enqueue import arq_pool
from jobs.store import BatchStore
from shared import tracing
from shared.logging import configure as configure_logging
from shared.settings import Settings

log = structlog.get_logger(__name__)

_UNTRACED = frozenset({"/health", "/ready", "/ping", "/metrics", "/version"})
"""Probes and scrapes: no spans."""


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client = connect(settings.redis_url)
        app.state.redis = client
        tokenizers = Tokenizers(settings)
        # Load tokenizers of prepared models now, so the first request does not pay for it.
        await asyncio.to_thread(tokenizers.load_prepared)
        app.state.api_keys = ApiKeys(client)
        limiter = RateLimiter(client, lease_s=settings.request_timeout_s + GRACE_AFTER_DEADLINE_S)
        app.state.completions = Completions(settings, QueueClient(client, settings), tokenizers, limiter)
        app.state.jobs = Jobs(app.state.completions)
        arq = await arq_pool(settings)
        app.state.batches = Batches(settings, BatchStore(client), arq)
        try:
            yield
        finally:
            await arq.aclose()
            await client.aclose()

    traces = tracing.provider(settings, "llmfleet-gateway")
    # FastAPI's own span of each request (HTTP metrics and logs are Prometheus' and structlog's here).
    telemetry = {"tracing": traces is not None, "tracer_provider": traces, "metrics": False, "logs": False,
                 "operation_spans": False, "exclude": lambda scope: scope.get("path") in _UNTRACED}  # fmt: skip
    # No /docs: the security headers forbid the scripts it needs. The schema stays at /openapi.json.
    app = FastAPI(title="llmfleet gateway", lifespan=lifespan, docs_url=None, redoc_url=None, telemetry=telemetry)
    app.state.settings = settings
    app.state.started = time.time()
    errors.install(app)
    app.include_router(router)
    protection = settings.protection
    # Added innermost first: headers wrap everything, authentication runs before any body is read.
    uploads = {UPLOAD_PATH: settings.jobs.max_file_bytes + UPLOAD_ENVELOPE_BYTES}
    app.add_middleware(BodyLimit, max_bytes=protection.max_body_bytes, path_limits=uploads)
    app.add_middleware(Authentication, state=app.state, open_mode=protection.auth == "open")
    if protection.cors_origins:  # outside authentication: a browser's preflight carries no key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=protection.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["*"],  # the SDKs send their own (x-stainless-*) beside authorization
            expose_headers=["retry-after", "location"],
        )
    app.add_middleware(SecurityHeaders)
    if protection.auth == "open":
        log.warning("gateway.auth_open", note="no API keys required: local development only")
    # Added last, so it is the outermost middleware and sees every response, refusals by others included.
    app.add_middleware(RequestCounter)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway")
    settings = Settings()
    parser.add_argument("--host", default=settings.gateway_host)
    parser.add_argument("--port", type=int, default=settings.gateway_port)
    args = parser.parse_args(argv)
    configure_logging(settings.log_level, process="gateway")
    # On SIGTERM uvicorn stops accepting; open streams get drain_grace_s to end (gateway.serving).
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level="warning",
        log_config=None,  # uvicorn's records go to the root logger: JSON and masked (shared.logging)
        access_log=False,
        timeout_keep_alive=settings.gateway_keep_alive_s,
        timeout_graceful_shutdown=int(settings.delivery.drain_grace_s) + 1,
    )
