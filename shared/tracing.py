"""OpenTelemetry traces (vLLM's --otlp-traces-endpoint, TGI's --otlp-endpoint), sent over OTLP/HTTP where
`tracing.otlp_traces_endpoint` says. The gateway's span of each HTTP request is FastAPI's own (it continues the
client's W3C `traceparent`); the trace context crosses Redis in the request (InferenceRequest.trace_headers), and the
worker that ends a request adds vLLM's `llm_request` span under it, from the gateway's acceptance to the end, with
vLLM's gen_ai attributes. No prompt or output text goes into a span."""

from __future__ import annotations

from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared.protocol import FinalResult, InferenceRequest
from shared.settings import Settings


def provider(settings: Settings, service: str) -> TracerProvider | None:
    """Spans of `service` batched to the OTLP endpoint (flushed at exit), or None where tracing is off."""
    endpoint = settings.tracing.otlp_traces_endpoint
    if endpoint is None:
        return None
    traces = TracerProvider(resource=Resource.create({"service.name": service}))
    traces.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return traces


def current_headers() -> dict[str, str] | None:
    """The current span's context as W3C headers (traceparent, tracestate), or None outside a span."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


def request_span(tracer: trace.Tracer, request: InferenceRequest, final: FinalResult) -> None:
    """vLLM's `llm_request` span of a request that ended here, under the gateway's span that queued it."""
    sampling, timings = request.sampling, final.timings
    attributes = {
        "gen_ai.request.id": request.id,
        "gen_ai.response.model": request.adapter or request.model,
        "gen_ai.request.max_tokens": sampling.max_tokens,
        "gen_ai.request.temperature": sampling.temperature,
        "gen_ai.request.top_p": sampling.top_p,
        "gen_ai.usage.prompt_tokens": final.prompt_tokens,
        "gen_ai.usage.completion_tokens": final.completion_tokens,
        "gen_ai.usage.cached_tokens": final.cached_tokens,
        "gen_ai.latency.time_in_queue": timings.queued_s,
        "gen_ai.latency.e2e": timings.total_s,
        "llmfleet.finish_reason": final.finish_reason,
        "llmfleet.worker": final.worker or "",
    }
    if timings.ttft_s is not None:
        attributes["gen_ai.latency.time_to_first_token"] = timings.ttft_s
    span = tracer.start_span(
        "llm_request",
        context=propagate.extract(request.trace_headers or {}),
        kind=SpanKind.CONSUMER,  # it was taken off a queue
        start_time=int(request.created * 1e9),
        attributes=attributes,
    )
    if not final.completed:
        span.set_status(Status(StatusCode.ERROR, final.error or final.finish_reason))
    span.end(end_time=int(final.finished * 1e9))
