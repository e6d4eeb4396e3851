"""OpenTelemetry traces (tracing.otlp_traces_endpoint, vLLM's --otlp-traces-endpoint): a request's spans reach an
OTLP/HTTP collector, the gateway's under the client's `traceparent` and the worker's `llm_request` under the
gateway's, across Redis."""

from __future__ import annotations

import gzip
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


class Collector:
    """An OTLP/HTTP trace receiver: every span it is sent, with its service's name."""

    def __init__(self):
        self.spans: list[tuple[str, object]] = []
        collector = self

        class Receive(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                export = ExportTraceServiceRequest.FromString(body)
                for resource in export.resource_spans:
                    named = {a.key: a.value.string_value for a in resource.resource.attributes}
                    service = named["service.name"]
                    collector.spans += [(service, s) for scoped in resource.scope_spans for s in scoped.spans]
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Receive)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def wait_for(self, count: int, timeout: float = 30.0) -> list[tuple[str, object]]:
        deadline = time.time() + timeout
        while len(self.spans) < count and time.time() < deadline:
            time.sleep(0.2)
        return self.spans


@pytest.fixture
def collector():
    received = Collector()
    yield received
    received.server.shutdown()


def test_a_requests_spans_continue_the_clients_trace_through_the_gateway_and_the_worker(fleet, model_dir, collector):
    models = json.dumps({"traced": {"path": str(model_dir)}})
    traced = {"LLMFLEET_MODELS": models, "LLMFLEET_TRACING__OTLP_TRACES_ENDPOINT": collector.endpoint}
    worker = fleet.worker("traced", **traced)
    gateway = fleet.gateway(LLMFLEET_PROTECTION__AUTH="open", **traced)
    try:
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
        trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        reply = client.chat.completions.create(
            model="traced", messages=[{"role": "user", "content": "Say hello."}], max_tokens=5,
            extra_headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
        )  # fmt: skip
        client.models.list()  # a span of its own, not of the trace
        spans = collector.wait_for(3)
    finally:
        worker.stop()
        gateway.stop()
    ours = {s.name: (service, s) for service, s in spans if s.trace_id.hex() == trace_id}
    assert set(ours) == {"POST /v1/chat/completions", "llm_request"}, [s.name for _, s in spans]
    service, http = ours["POST /v1/chat/completions"]
    assert service == "llmfleet-gateway" and http.parent_span_id.hex() == parent_id
    service, inference = ours["llm_request"]
    assert service == "llmfleet-worker" and inference.parent_span_id == http.span_id
    attributes = {a.key: a.value for a in inference.attributes}
    assert attributes["gen_ai.request.id"].string_value == reply.id.removeprefix("chatcmpl-")
    assert attributes["gen_ai.usage.completion_tokens"].int_value == reply.usage.completion_tokens
    assert attributes["gen_ai.latency.time_to_first_token"].double_value > 0
    assert inference.start_time_unix_nano >= http.start_time_unix_nano
    assert inference.end_time_unix_nano <= http.end_time_unix_nano
