"""vLLM's priority scheduling (scheduling_policy "priority"): a request's `priority` picks its lane in the queue,
and a waiting request never starts after a less urgent one, whatever their order of arrival."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from gateway.errors import APIError
from gateway.queue_client import MAX_LANES, QueueClient, connect
from loadtest.priority_mix import run_priority
from loadtest.servers import Server
from shared import keys
from shared.protocol import FINISHED_BUCKET_S, InferenceRequest, SamplingParams
from shared.settings import Settings
from tests.conftest import MODEL
from tests.fleet import Fleet, RedisServer, wait_until
from tests.test_validation import assert_openai_error


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory, model_dir):
    """A worker that runs one request at a time, so that everything else waits in the queue."""
    redis_server = RedisServer(tmp_path_factory.mktemp("redis-priority")).start()
    fleet = Fleet(
        redis_server, tmp_path_factory.mktemp("logs-priority"),
        LLMFLEET_SCHEDULING_POLICY="priority", LLMFLEET_BATCH__MAX_RUNNING="1",
    )  # fmt: skip
    fleet.worker(MODEL)
    gateway = fleet.gateway()
    yield redis_server.client(), gateway.url
    fleet.close()
    redis_server.stop()


def completion(url: str, priority: int, max_tokens: int = 4) -> httpx.Response:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True}
    return httpx.post(f"{url}/v1/completions", json={**body, "priority": priority}, timeout=120)


def test_a_queued_request_starts_before_less_urgent_ones_that_came_first(one_slot):
    client, url = one_slot
    finished: list[int] = []

    def send(priority: int, max_tokens: int = 4) -> threading.Thread:
        def run():
            reply = completion(url, priority, max_tokens)
            assert reply.status_code == 200, reply.text
            finished.append(priority)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    def queued(priority: int) -> int:
        lane = keys.requests(MODEL, priority)
        return client.xlen(lane) - (client.xpending(lane, keys.WORKER_GROUP)["pending"] if client.exists(lane) else 0)

    threads = [send(-10, max_tokens=256)]  # holds the one slot (none is more urgent) while the others queue
    first = keys.requests(MODEL, -10)
    wait_until(lambda: client.exists(first) and client.xlen(first) == 1 and queued(-10) == 0, 30, "the first to start")
    for priority, waiting in [(5, 1), (5, 2), (-5, 1), (1, 1)]:
        threads.append(send(priority))
        wait_until(lambda p=priority, n=waiting: queued(p) == n, 30, f"a request queued at priority {priority}")
    for thread in threads:
        thread.join(timeout=120)
    assert finished == [-10, -5, 1, 5, 5]
    assert client.zrange(keys.lanes(MODEL), 0, -1, withscores=True) == [
        (first, -10.0), (keys.requests(MODEL, -5), -5.0), (keys.requests(MODEL, 1), 1.0),
        (keys.requests(MODEL, 5), 5.0),
    ]  # fmt: skip


def test_a_more_urgent_request_takes_a_running_ones_slot_and_that_one_then_goes_on(one_slot):
    client, url = one_slot
    ended: list[tuple[int, int]] = []

    def low() -> None:
        reply = completion(url, 5, max_tokens=200)
        ended.append((5, reply.json()["usage"]["completion_tokens"]))

    thread = threading.Thread(target=low)
    thread.start()
    lane = keys.requests(MODEL, 5)
    wait_until(
        lambda: client.exists(lane) and client.xpending(lane, keys.WORKER_GROUP)["pending"] == 1, 30, "it to start"
    )
    urgent = completion(url, -5)
    ended.append((-5, urgent.json()["usage"]["completion_tokens"]))
    thread.join(timeout=120)
    assert ended == [(-5, 4), (5, 200)], "the urgent one did not wait for the 200 tokens of the running one"


def test_a_new_priority_value_past_the_lanes_a_model_keeps_is_400_and_a_known_one_is_served(one_slot):
    client, url = one_slot
    in_use = {int(score) for _, score in client.zrange(keys.lanes(MODEL), 0, -1, withscores=True)}
    added = range(100, 100 + MAX_LANES - len(in_use))
    for priority in added:
        assert completion(url, priority, max_tokens=1).status_code == 200
    error = assert_openai_error(completion(url, 99, max_tokens=1), 400, "priority")
    assert str(MAX_LANES) in error["message"]
    assert completion(url, 100, max_tokens=1).status_code == 200
    assert completion(url, 0, max_tokens=1).status_code == 200
    for priority in added:  # as an operator would: the lanes are empty
        client.zrem(keys.lanes(MODEL), keys.requests(MODEL, priority))
        client.delete(keys.requests(MODEL, priority))


def test_a_lane_whose_stream_was_deleted_is_made_again(one_slot):
    client, url = one_slot
    client.delete(keys.requests(MODEL, -5))
    started = time.monotonic()
    assert completion(url, -5, max_tokens=1).status_code == 200
    assert time.monotonic() - started < 30


def test_the_wait_ahead_counts_only_the_lanes_as_urgent_or_more(one_slot, tmp_path):
    """SUBMIT's deadline check: less urgent lanes' entries are not ahead of a request, more urgent ones are."""
    client, _ = one_slot
    model = "lanes-only"  # no worker reads its streams
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}/0",
        models={model: {"path": str(tmp_path)}}, scheduling_policy="priority", require_live_worker=False,
    )  # fmt: skip
    bucket = int(time.time() // FINISHED_BUCKET_S)
    for back in (1, 2):
        client.set(keys.finished(model, bucket - back), 2, ex=120)  # about 5 s a waiting entry

    def submit(priority: int, timeout_s: float) -> None:
        async def go():
            queue = QueueClient(connect(settings.redis_url), settings)
            request = InferenceRequest(
                id=f"lanes-{priority}-{time.time_ns()}", model=model, prompt_token_ids=[1],
                sampling=SamplingParams(max_tokens=1), deadline=time.time() + timeout_s, priority=priority,
            )  # fmt: skip
            try:
                await queue.submit(request)
            finally:
                await queue.redis.aclose()

        asyncio.run(go())

    submit(5, 60)  # waits in lane 5
    submit(0, 2)  # nothing ahead of it: lane 5 comes after
    with pytest.raises(APIError) as refused:
        submit(5, 8)  # lane 0's entry and lane 5's: about 10 s
    assert refused.value.code == "deadline_unreachable"
    submit(-1, 2)  # ahead of both


def test_the_priority_workload_sends_urgent_requests_beside_a_queue(one_slot):
    _, url = one_slot
    server = Server("llmfleet priority", f"{url}/v1", MODEL, priorities=True)
    urgent, background = asyncio.run(run_priority(server, 2, 2, 4, seed=1, fill_s=0.5))
    assert (urgent.workload, urgent.requests, urgent.errors) == ("priority urgent", 2, 0)
    assert background.workload == "priority background" and background.errors == 0
