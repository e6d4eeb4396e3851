"""Across the fleet, a conversation's next turn goes to the worker that holds its prefix, while that worker can
take it; when it dies the conversation carries on elsewhere."""

from __future__ import annotations

import signal

import httpx
import pytest

from shared import keys
from shared.protocol import FinalResult
from tests.conftest import MODEL
from tests.fleet import Fleet, RedisServer
from tests.test_metrics import samples, value


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, model_dir):
    redis_server = RedisServer(tmp_path_factory.mktemp("redis-affinity")).start()
    fleet = Fleet(redis_server, tmp_path_factory.mktemp("logs-affinity"), LLMFLEET_TORCH_THREADS="1")
    workers = [fleet.worker(MODEL), fleet.worker(MODEL)]
    gateway = fleet.gateway()
    yield redis_server, workers, gateway.url
    fleet.close()
    redis_server.stop()


def turn(url: str, redis_client, messages: list[dict], conversation: str) -> tuple[str, str, int]:
    """The answer, the worker that gave it, and how many prompt tokens it reused from its prefix cache."""
    reply = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0},
        headers={"X-Conversation-Id": conversation},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    final = FinalResult.model_validate_json(redis_client.get(keys.result(reply.headers["x-request-id"])))
    body = reply.json()
    cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
    return body["choices"][0]["message"]["content"], final.worker, cached


def test_turns_follow_the_worker_that_holds_the_conversation_and_move_on_when_it_dies(two_workers):
    redis_server, workers, url = two_workers
    client = redis_server.client()
    messages = [{"role": "system", "content": "You are a helpful assistant. " * 20}, {"role": "user", "content": "Hi!"}]
    answer, first, cached = turn(url, client, messages, "conv-1")
    assert cached == 0
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Tell me a joke."}]
    answer, second, cached = turn(url, client, messages, "conv-1")
    assert second == first
    assert cached > 100  # the system prompt and turn 1 came from the cache

    [holder] = [w for w in workers if w.worker_id == first]
    routes = samples(url)
    assert value(routes, "llmfleet:affinity_routes_total", model_name=MODEL, outcome="unknown") == 1
    assert value(routes, "llmfleet:affinity_routes_total", model_name=MODEL, outcome="hit") == 1
    cache = samples(holder.url)
    assert value(cache, "llmfleet:prefix_cache_hits_total", model_name=MODEL) > 0
    assert value(cache, "llmfleet:prefix_cache_tokens", model_name=MODEL) > 0
    assert value(cache, "llmfleet:prefix_cache_bytes", model_name=MODEL) > 0
    assert value(cache, "llmfleet:prefix_cache_evictions_total", model_name=MODEL) == 0
    holder.stop(signal.SIGKILL)
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Another one."}]
    _, third, cached = turn(url, client, messages, "conv-1")
    assert third != first and cached == 0
