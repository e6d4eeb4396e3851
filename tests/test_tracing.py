"""OpenTelemetry traces (tracing.otlp_traces_endpoint, vLLM's --otlp-traces-endpoint): a request's spans reach an
OTLP/HTTP collector, the gateway's under the client's `traceparent` and the worker's `llm_request` under the
gateway's, across Redis."""

from __future__ import annotations

import gzip
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.fleet import wait_until


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


def test_a_batchs_lines_are_traced_under_the_request_that_created_it(fleet, model_dir, collector):
    """The batch's lines run later, in the job layer: their worker spans still join the trace of POST /v1/batches."""
    models = json.dumps({"traced": {"path": str(model_dir)}})
    traced = {"LLMFLEET_MODELS": models, "LLMFLEET_TRACING__OTLP_TRACES_ENDPOINT": collector.endpoint}
    worker = fleet.worker("traced", **traced)
    gateway = fleet.gateway(LLMFLEET_PROTECTION__AUTH="open", **traced)
    jobs = fleet.jobs_worker(**traced)
    try:
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
        lines = [
            json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
                        "body": {"model": "traced", "prompt": f"{i},", "max_tokens": 2}})
            for i in range(2)
        ]  # fmt: skip
        upload = client.files.create(file=("in.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
        trace_id = "5cf92f3577b34da6a3ce929d0e0e4737"
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h",
            extra_headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b8-01"},
        )  # fmt: skip
        wait_until(lambda: client.batches.retrieve(batch.id).status == "completed", 120, "the batch completed", 0.3)

        def ours() -> list[tuple[str, object]]:
            return [(service, s) for service, s in collector.spans if s.trace_id.hex() == trace_id]

        wait_until(lambda: len(ours()) >= 3, 30, "the batch's spans")
    finally:
        jobs.stop()
        worker.stop()
        gateway.stop()
    (created,) = [s for service, s in ours() if s.name == "POST /v1/batches" and service == "llmfleet-gateway"]
    inferences = [s for service, s in ours() if s.name == "llm_request" and service == "llmfleet-worker"]
    assert len(inferences) == 2 and all(s.parent_span_id == created.span_id for s in inferences)
