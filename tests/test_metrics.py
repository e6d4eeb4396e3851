"""/metrics, /health and /ready of running gateways and workers, and the queue signal workers scale on."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODEL
from tests.fleet import Fleet, RedisServer, wait_until
from tests.test_deploy_manifests import dashboard_metric_names


def samples(url: str) -> dict[tuple[str, frozenset], float]:
    reply = httpx.get(f"{url}/metrics", timeout=10)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(reply.text)
        for s in family.samples
    }


def value(found: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in found.items() if n == name and set(labels.items()) <= ls)


@pytest.fixture(scope="module")
def served(client, fleet, gateway_url, auth_headers):
    """One finished streaming request and one refused one, then a scrape of the gateway and the worker."""
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True
    )
    assert [c for c in stream]
    refused = {"model": MODEL, "prompt": "x", "max_tokens": -1}
    httpx.post(f"{gateway_url}/v1/completions", json=refused, headers=auth_headers, timeout=10)
    worker = next(p for p in fleet.procs if p.worker_id)
    return samples(gateway_url), samples(worker.url)


def test_every_series_the_dashboard_queries_is_exported_by_a_gateway_or_a_worker(served):
    gateway, worker = served
    exported = {name for name, _ in gateway} | {name for name, _ in worker}
    assert dashboard_metric_names() - exported == set()


def test_gateway_counts_requests_by_model_status_and_key_name(served):
    gateway, _ = served
    assert value(gateway, "llmfleet:requests_total", model_name=MODEL, status="200", key_name="tests") >= 1
    assert value(gateway, "llmfleet:requests_total", status="400") >= 1
    assert value(gateway, "llmfleet:live_workers", model_name=MODEL) >= 1


def test_worker_exports_latency_histograms_tokens_and_finish_reasons(served):
    _, worker = served
    assert value(worker, "llmfleet:request_success_total", model_name=MODEL, finished_reason="length") >= 1
    assert value(worker, "llmfleet:time_to_first_token_seconds_count", model_name=MODEL) >= 1
    assert value(worker, "llmfleet:inter_token_latency_seconds_count", model_name=MODEL) >= 3
    assert value(worker, "llmfleet:generation_tokens_total", model_name=MODEL) >= 4
    assert value(worker, "llmfleet:prompt_tokens_total", model_name=MODEL) >= 1
    assert value(worker, "llmfleet:num_requests_running", model_name=MODEL) == 0
    assert 0 <= value(worker, "llmfleet:kv_cache_usage_perc", model_name=MODEL) <= 1


def test_a_serving_worker_is_alive_and_ready(fleet):
    worker = next(p for p in fleet.procs if p.worker_id)
    assert httpx.get(f"{worker.url}/health", timeout=5).json()["status"] == "ok"
    assert httpx.get(f"{worker.url}/ready", timeout=5).json() == {"status": "ready"}
    assert httpx.get(f"{worker.url}/nope", timeout=5).status_code == 404


def test_with_no_worker_a_request_waits_in_the_queue_and_shows_as_lag(model_dir, tmp_path):
    """The scale-from-zero signal: a gateway that queues without live workers leaves the entry unread."""
    server = RedisServer(tmp_path / "redis").start()
    fleet = Fleet(server, tmp_path, LLMFLEET_REQUIRE_LIVE_WORKER="false")
    try:
        gateway = fleet.gateway()
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
        with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=10) as reply:
            assert reply.status_code == 200
            next(reply.iter_lines())  # the request is queued before the first chunk
            found = wait_until(lambda: _with_lag(samples(gateway.url)), 10, "queue lag")
        assert value(found, "llmfleet:queue_depth", model_name=MODEL) == 1
        assert value(found, "llmfleet:queue_pending", model_name=MODEL) == 0
        assert value(found, "llmfleet:live_workers", model_name=MODEL) == 0
    finally:
        fleet.close()
        server.stop()


def _with_lag(found: dict) -> dict | None:
    return found if value(found, "llmfleet:queue_lag", model_name=MODEL) == 1 else None
