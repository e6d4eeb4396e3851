"""Chaos: real Redis, real workers and a real gateway as subprocesses, killed and restarted under load.

Every loop is bounded in count and time; requests are short (a few greedy tokens) so the file runs in minutes.

The greedy reference. Greedy output in bf16 depends slightly on batch composition (a near-tie such as "I am" /
"I'm" can flip), so "equal to the text computed alone" is not a sound check under batching. What is checked
for every completed request instead: the streamed text equals the final record's text; the output stream holds
contiguous token ids (one per position, none repeated or skipped, the resume invariant) that decode to that
text; and each of those tokens is a greedy choice of the model evaluated alone on the prompt plus the tokens
before it: its logit is within GREEDY_TOLERANCE of the best one. A duplicated, skipped or garbled token
after a resume fails this by a wide margin."""

from __future__ import annotations

import json
import random
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from gateway.prompts import PromptTokenizer, chat_token_ids
from gateway.protocol import ChatCompletionRequest
from shared import keys
from shared.protocol import FinalResult, InferenceRequest, SamplingParams
from tests.conftest import MODEL
from tests.fleet import Fleet, RedisServer, wait_until
from worker.reclaim import resume_point

PROMPTS = [
    "Name a color.",
    "What is 2 + 2?",
    "Say hello.",
    "Name a fruit.",
    "What is the capital of France?",
    "Name an animal.",
    "Give me a number.",
    "Name a planet.",
]
MAX_TOKENS = 8
GREEDY_TOLERANCE = 0.5
DRAIN_TOKENS = 16
"""Long enough to be mid-generation when the drain's grace ends."""
FAST = {"LLMFLEET_TORCH_THREADS": "1", "LLMFLEET_DELIVERY__RECLAIM_IDLE_S": "2"}


@dataclass
class Outcome:
    prompt: str
    request_id: str | None = None
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    started: float = 0.0
    ended: float = 0.0


def stream_chat(url: str, prompt: str, max_tokens: int = MAX_TOKENS) -> Outcome:
    """One streaming chat request read to its end; any failure is recorded, never raised."""
    outcome = Outcome(prompt, started=time.time())
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as reply:
            outcome.request_id = reply.headers.get("x-request-id")
            if reply.status_code != 200:
                outcome.error = f"{reply.status_code}: {reply.read()[:200]!r}"
                return outcome
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    outcome.error = chunk["error"]["message"]
                    continue
                for choice in chunk["choices"]:
                    outcome.text += choice["delta"].get("content") or ""
                    outcome.finish_reason = choice["finish_reason"] or outcome.finish_reason
    except httpx.HTTPError as error:
        outcome.error = repr(error)
    outcome.ended = time.time()
    return outcome


class GreedyReference:
    """Checks token ids against the model run alone (see the module docstring)."""

    def __init__(self, loaded, model_dir):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.prompts = PromptTokenizer(model_dir)
        self.checked: dict[tuple[int, ...], float] = {}

    def prompt_ids(self, prompt: str) -> list[int]:
        body = ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": prompt}])
        return chat_token_ids(self.prompts, body)

    def worst_margin(self, prompt: str, generated: list[int]) -> float:
        """How far below the best logit the least greedy generated token was (0: all were the argmax)."""
        import torch

        ids = self.prompt_ids(prompt) + generated
        if tuple(ids) not in self.checked:
            with torch.inference_mode():
                logits = self.model(torch.tensor([ids])).logits[0].float()
            rows = logits[len(ids) - len(generated) - 1 : len(ids) - 1]
            chosen = rows[torch.arange(len(generated)), torch.tensor(generated)]
            self.checked[tuple(ids)] = float((rows.max(dim=-1).values - chosen).max()) if generated else 0.0
        return self.checked[tuple(ids)]


@pytest.fixture(scope="module")
def greedy(loaded_model, model_dir) -> GreedyReference:
    return GreedyReference(loaded_model, model_dir)


def check_completed(redis_client, outcome: Outcome, greedy: GreedyReference) -> None:
    assert outcome.error is None, outcome
    assert outcome.finish_reason in ("stop", "length"), outcome
    # Where a worker died between the final record and the result record, the worker that reclaims the request
    # writes the result record, seconds later (delivery.reclaim_idle_s).
    body = wait_until(lambda: redis_client.get(keys.result(outcome.request_id)), 30, "the result record")
    final = FinalResult.model_validate_json(body)
    assert outcome.text == final.text, "streamed text differs from the final record"
    point = resume_point(redis_client.xrange(keys.output(outcome.request_id)))
    assert len(point.token_ids) == final.completion_tokens, "output stream token ids are not contiguous"
    assert greedy.tokenizer.decode(point.token_ids, skip_special_tokens=True) == final.text
    assert greedy.worst_margin(outcome.prompt, point.token_ids) <= GREEDY_TOLERANCE, outcome


def reclaimed_ids(fleet: Fleet) -> set[str]:
    found = set()
    for proc in fleet.procs:
        for line in proc.log.read_text(errors="replace").splitlines():
            if '"request.reclaimed"' in line:
                found.add(json.loads(line)["request_id"])
    return found


@pytest.fixture
def chaos_redis(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def make_fleet(chaos_redis, model_dir, tmp_path):
    fleets = []

    def make(**env: str) -> Fleet:
        fleet = Fleet(chaos_redis, tmp_path, **{**FAST, **env})
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        fleet.close()


def test_sigkill_of_random_workers_loses_and_duplicates_nothing(make_fleet, chaos_redis, greedy):
    fleet = make_fleet(LLMFLEET_DELIVERY__MAX_DELIVERIES="10")
    workers = [fleet.worker(MODEL) for _ in range(3)]
    gateway = fleet.gateway()
    done = threading.Event()
    kills = 0

    def killer() -> None:
        nonlocal kills
        rng = random.Random(5)
        while not done.wait(3.0) and kills < 8:
            alive = [w for w in workers if w.process.poll() is None]
            victim = rng.choice(alive)
            victim.process.kill()
            kills += 1
            workers.remove(victim)
            workers.append(fleet.worker(MODEL, wait=False))

    chaos = threading.Thread(target=killer)
    chaos.start()
    try:
        with ThreadPoolExecutor(24) as pool:
            outcomes = list(pool.map(lambda i: stream_chat(gateway.url, PROMPTS[i % len(PROMPTS)]), range(300)))
    finally:
        done.set()
        chaos.join()

    client = chaos_redis.client()
    failed = [o for o in outcomes if o.error or o.finish_reason not in ("stop", "length")]
    assert not failed, failed[:3]
    for outcome in outcomes:
        check_completed(client, outcome, greedy)
    assert len({o.request_id for o in outcomes}) == 300
    assert kills >= 2

    reclaimed = reclaimed_ids(fleet) & {o.request_id for o in outcomes}
    latency = {o.request_id: o.ended - o.started for o in outcomes}
    normal = statistics.median(v for k, v in latency.items() if k not in reclaimed)
    extra = sorted(latency[r] - normal for r in reclaimed)
    if extra:
        p95 = extra[min(len(extra) - 1, int(0.95 * len(extra)))]
        print(
            f"\nkills={kills} reclaimed={len(extra)} extra latency p50={statistics.median(extra):.2f}s p95={p95:.2f}s"
        )


def test_sigterm_drains_a_worker_without_failing_a_request(make_fleet, chaos_redis, greedy):
    fleet = make_fleet(LLMFLEET_DELIVERY__DRAIN_GRACE_S="1")
    leaving = fleet.worker(MODEL)
    fleet.worker(MODEL)
    gateway = fleet.gateway()
    with ThreadPoolExecutor(40) as pool:
        futures = [pool.submit(stream_chat, gateway.url, PROMPTS[i % 8], DRAIN_TOKENS) for i in range(60)]
        time.sleep(1.5)
        assert leaving.stop(signal.SIGTERM, timeout=30) == 0
        outcomes = [f.result() for f in futures]
    client = chaos_redis.client()
    for outcome in outcomes:
        check_completed(client, outcome, greedy)
    log = leaving.log.read_text()
    assert '"worker.draining"' in log and '"worker.stopped"' in log
    assert client.zscore(keys.live_workers(MODEL), leaving.worker_id) is None


def test_redis_restart_loses_no_job_acknowledged_before_the_fsync_window(make_fleet, chaos_redis):
    fleet = make_fleet()
    fleet.worker(MODEL)
    gateway = fleet.gateway()
    acked: list[tuple[str, float]] = []
    killed_at = time.time() + 3.0

    def kill_then_restart() -> None:
        time.sleep(killed_at - time.time())
        chaos_redis.kill()
        time.sleep(2.0)
        chaos_redis.start()

    outage = threading.Thread(target=kill_then_restart)
    outage.start()
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        i = 0
        while time.time() < killed_at + 6.0:
            i += 1
            try:
                reply = http.post("/v1/jobs", json={"model": MODEL, "prompt": PROMPTS[i % 8], "max_tokens": 4})
            except httpx.HTTPError:
                continue
            if reply.status_code == 202:
                acked.append((reply.json()["id"], time.time()))
            time.sleep(0.1)
        outage.join()

        def status(job_id: str) -> str:
            reply = http.get(f"/v1/jobs/{job_id}")
            return "lost" if reply.status_code == 404 else reply.json()["status"]

        final = {}
        for job_id, _ in acked:
            final[job_id] = wait_until(lambda j=job_id: (s := status(j)) not in ("queued", "running") and s, 60, job_id)
    before_window = [j for j, at in acked if at < killed_at - 1.0]
    assert len(before_window) >= 10
    assert [final[j] for j in before_window] == ["completed"] * len(before_window)
    after = [j for j, at in acked if at > killed_at]
    assert after and all(final[j] == "completed" for j in after)
    lost = sum(1 for s in final.values() if s == "lost")
    print(f"\nacked={len(acked)} lost_within_window={lost}")


def test_a_hundred_clients_disconnecting_mid_stream_free_every_slot(make_fleet, chaos_redis):
    fleet = make_fleet()
    worker = fleet.worker(MODEL)
    gateway = fleet.gateway()
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
    ids = []

    def read_two_chunks_then_leave(_) -> None:
        with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=60) as reply:
            ids.append(reply.headers["x-request-id"])
            for n, _ in enumerate(x for x in reply.iter_lines() if x.startswith("data: ")):
                if n >= 1:
                    return

    with ThreadPoolExecutor(100) as pool:
        list(pool.map(read_two_chunks_then_leave, range(100)))
    client = chaos_redis.client()

    def all_cancelled() -> bool:
        return all(client.get(keys.result(i)) for i in ids)

    wait_until(all_cancelled, 60, "a final record for every request")
    finals = [FinalResult.model_validate_json(client.get(keys.result(i))) for i in ids]
    assert {f.finish_reason for f in finals} == {"cancelled"}
    assert all(f.completion_tokens < 400 for f in finals)
    state = httpx.get(f"{worker.url}/health").json()
    assert (state["running"], state["waiting"], state["free_slots"]) == (0, 0, 32)


def test_a_request_delivered_too_often_is_dead_lettered_and_fails_with_a_reason(make_fleet, chaos_redis, greedy):
    fleet = make_fleet(LLMFLEET_DELIVERY__MAX_DELIVERIES="2")
    client = chaos_redis.client()
    stream = keys.requests(MODEL)
    client.xgroup_create(stream, keys.WORKER_GROUP, id="0", mkstream=True)
    now = time.time()
    request = InferenceRequest(
        id="poison-1",
        model=MODEL,
        prompt_token_ids=greedy.prompt_ids("Say hello."),
        sampling=SamplingParams(max_tokens=4, temperature=0),
        deadline=now + 60,
    )
    entry_id = client.xadd(stream, {"r": request.model_dump_json()})
    # Two deliveries to consumers that "died" holding it; the next one is over the limit.
    client.xreadgroup(keys.WORKER_GROUP, "ghost", {stream: ">"})
    client.xclaim(stream, keys.WORKER_GROUP, "ghost", 0, [entry_id], idle=60_000)
    fleet.worker(MODEL)
    wait_until(lambda: client.get(keys.result(request.id)), 30, "the poison request's final record")
    final = FinalResult.model_validate_json(client.get(keys.result(request.id)))
    assert final.finish_reason == "error" and "dead-letter" in final.error
    [(_, dead)] = client.xrange(keys.dead_letters(MODEL))
    assert dead["deliveries"] == "3" and InferenceRequest.model_validate_json(dead["r"]).id == request.id
    assert client.xpending(stream, keys.WORKER_GROUP)["pending"] == 0


def test_a_request_whose_worker_died_after_its_final_record_gets_its_result_record(make_fleet, chaos_redis, greedy):
    """A worker's last pipeline can stop between the final record on the output stream and the result record (a
    SIGKILL between two socket writes): the worker that reclaims the entry writes the result record from it."""
    fleet = make_fleet()
    client = chaos_redis.client()
    stream = keys.requests(MODEL)
    client.xgroup_create(stream, keys.WORKER_GROUP, id="0", mkstream=True)
    request = InferenceRequest(
        id="cut-short-1",
        model=MODEL,
        prompt_token_ids=greedy.prompt_ids("Say hello."),
        sampling=SamplingParams(max_tokens=4, temperature=0),
        deadline=time.time() + 60,
    )
    entry_id = client.xadd(stream, {"r": request.model_dump_json()})
    client.xreadgroup(keys.WORKER_GROUP, "ghost", {stream: ">"})
    client.xclaim(stream, keys.WORKER_GROUP, "ghost", 0, [entry_id], idle=60_000)
    final = FinalResult(id=request.id, model=MODEL, text="Hello!", finish_reason="stop", completion_tokens=2)
    client.xadd(keys.output(request.id), {"f": final.model_dump_json()})
    fleet.worker(MODEL)
    wait_until(lambda: client.get(keys.result(request.id)), 30, "the result record")
    assert FinalResult.model_validate_json(client.get(keys.result(request.id))) == final
    wait_until(lambda: client.xpending(stream, keys.WORKER_GROUP)["pending"] == 0, 30, "the entry acknowledged")
