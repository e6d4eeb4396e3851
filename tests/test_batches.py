"""Batches through the openai client's files and batches calls, run by a real arq process (python -m jobs)."""

from __future__ import annotations

import io
import json
import signal

import openai
import pytest

from shared import keys
from shared.protocol import InferenceRequest
from tests.conftest import MODEL
from tests.fleet import create_api_key, wait_until

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"


def text_line(i: int, max_tokens: int, **extra) -> str:
    """A plain completion with a prompt of a few tokens: these tests are about the batch, not the model."""
    body = {"model": MODEL, "prompt": f"{i},", "max_tokens": max_tokens, "temperature": 0, **extra}
    return json.dumps({"custom_id": f"req-{i:04d}", "method": "POST", "url": TEXT, "body": body})


def chat_line(i: int, max_tokens: int) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": max_tokens,
            "temperature": 0}  # fmt: skip
    return json.dumps({"custom_id": f"req-{i:04d}", "method": "POST", "url": CHAT, "body": body})


@pytest.fixture(scope="module")
def jobs(fleet):
    """The module's arq process; a test may kill it and put a new one here."""
    holder = {"proc": fleet.jobs_worker(LLMFLEET_JOBS__BATCH_IN_FLIGHT="24")}
    yield holder
    holder["proc"].stop()


def submit(client: openai.OpenAI, lines: list[str], endpoint: str = TEXT):
    upload = client.files.create(file=("in.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
    return client.batches.create(input_file_id=upload.id, endpoint=endpoint, completion_window="24h")


def wait_for(client: openai.OpenAI, batch_id: str, statuses: tuple[str, ...], timeout: float = 240):
    return wait_until(
        lambda: (b := client.batches.retrieve(batch_id)).status in statuses and b, timeout, f"batch in {statuses}", 0.3
    )


def output(client: openai.OpenAI, batch) -> list[dict]:
    return [json.loads(raw) for raw in client.files.content(batch.output_file_id).text.splitlines()]


def test_batch_with_malformed_lines_gives_one_output_line_each_in_input_order(client, jobs):
    lines = [text_line(i, 1 + i % 4) for i in range(200)]
    lines[3] = "{not json"
    lines[50] = json.dumps({"method": "POST", "url": TEXT, "body": {"model": MODEL, "prompt": "x"}})
    lines[99] = text_line(99, 2).replace(TEXT, "/v1/embeddings")
    lines[120] = text_line(120, 2).replace("req-0120", "req-0007")
    lines[150] = text_line(150, 2, temperature=7)
    lines[199] = text_line(199, 2).replace(MODEL, "no-such-model")
    batch = submit(client, lines)
    assert batch.status == "validating"
    assert batch.request_counts.total == 0

    done = wait_for(client, batch.id, ("completed",))
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (200, 194, 6)
    rows = output(client, done)
    assert len(rows) == 200
    failed = {i: row["error"]["code"] for i, row in enumerate(rows) if row["error"]}
    assert failed == {3: "invalid_json", 50: "missing_custom_id", 99: "invalid_url", 120: "duplicate_custom_id",
                      150: "invalid_value", 199: "model_not_found"}  # fmt: skip
    answered = [row for row in rows if not row["error"]]
    assert [row["custom_id"] for row in answered] == [f"req-{i:04d}" for i in range(200) if i not in failed]
    assert all(row["response"]["status_code"] == 200 for row in answered)
    assert all(row["response"]["body"]["usage"]["completion_tokens"] >= 1 for row in answered)
    assert rows[150]["custom_id"] == "req-0150"


def test_cancelled_batch_accounts_for_every_line(client, jobs):
    batch = submit(client, [text_line(i, 16, ignore_eos=True) for i in range(60)])
    wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed > 0, 60, "first lines", 0.2)
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = wait_for(client, batch.id, ("cancelled",))
    rows = output(client, done)
    assert len(rows) == 60
    assert 0 < done.request_counts.completed < 60
    assert done.request_counts.completed + done.request_counts.failed == 60
    assert {row["error"]["code"] for row in rows if row["error"]} <= {"batch_cancelled", "request_cancelled"}


def test_batch_survives_kill_9_of_its_arq_process(client, fleet, jobs):
    lines = [text_line(i, 24, ignore_eos=True) for i in range(64)]
    batch = submit(client, lines)
    wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 8, 60, "some lines", 0.1)
    jobs["proc"].stop(signal.SIGKILL)
    assert client.batches.retrieve(batch.id).status == "in_progress"
    jobs["proc"] = fleet.jobs_worker(LLMFLEET_JOBS__BATCH_IN_FLIGHT="24")

    done = wait_for(client, batch.id, ("completed",))
    rows = output(client, done)
    assert [row["custom_id"] for row in rows] == [f"req-{i:04d}" for i in range(64)]
    assert all(row["error"] is None and row["response"]["body"]["usage"]["completion_tokens"] == 24 for row in rows)
    assert (done.request_counts.completed, done.request_counts.failed) == (64, 0)


def test_chat_batch_lines_are_queued_as_batch_lines_and_get_the_synchronous_chat_response(client, fleet, jobs):
    worker = fleet.procs[0].process
    worker.send_signal(signal.SIGSTOP)  # the lines stay in the stream while the worker is frozen
    try:
        batch = submit(client, [chat_line(i, 3) for i in range(3)], CHAT)
        stream = keys.batch_requests(MODEL)

        def queued() -> list[InferenceRequest]:
            entries = fleet.redis_server.client().xrange(stream)
            lines = [InferenceRequest.model_validate_json(fields["r"]) for _, fields in entries]
            return [line for line in lines if line.id.startswith(batch.id)]

        lines = wait_until(lambda: len(found := queued()) == 3 and found, 60, "three lines queued")
        assert all(line.batch for line in lines), "the worker prefills them after interactive prompts"
    finally:
        worker.send_signal(signal.SIGCONT)
    rows = output(client, wait_for(client, batch.id, ("completed",)))
    assert [row["response"]["body"]["object"] for row in rows] == ["chat.completion"] * 3
    assert all(row["response"]["body"]["choices"][0]["message"]["role"] == "assistant" for row in rows)


def test_a_line_of_several_choices_or_prompts_answers_them_all_as_the_synchronous_endpoint(client, jobs):
    lines = [
        text_line(0, 3, n=3, temperature=1.0, seed=5),
        text_line(1, 2, prompt=["The capital of France is", "One, two,"], n=2),
        text_line(2, 2, prompt=["A", "B", "C"], n=30),  # 90 sequences: over the 64 a request may start
    ]
    rows = output(client, wait_for(client, submit(client, lines).id, ("completed",)))
    choices = [c["index"] for c in rows[0]["response"]["body"]["choices"]]
    assert choices == [0, 1, 2] and rows[0]["response"]["body"]["usage"]["completion_tokens"] == 9
    pairs = rows[1]["response"]["body"]
    assert [c["index"] for c in pairs["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] for c in pairs["choices"])
    assert pairs["usage"]["prompt_tokens"] == 5 + 4, "each prompt counted once"
    assert rows[2]["error"]["code"] == "invalid_value"


def test_a_key_lists_its_own_batches_newest_first_page_by_page(client, jobs, fleet, gateway_url):
    """`client.batches.list()` follows OpenAI's cursor (`after`, `has_more`) through every page."""
    created = [submit(client, [text_line(i, 1)]).id for i in range(3)]
    listed = [batch.id for batch in client.batches.list(limit=2)]  # the SDK fetches page after page
    assert [i for i in listed if i in created] == created[::-1] and len(set(listed)) == len(listed)
    page = client.batches.list(limit=2)
    assert len(page.data) == 2 and page.has_more
    other = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=create_api_key(fleet.redis_server, name="tenant-b"))
    assert not set(created) & {batch.id for batch in other.batches.list()}
    with pytest.raises(openai.NotFoundError):
        other.batches.list(after=created[0])


def test_a_key_lists_and_deletes_its_own_files(client, fleet, gateway_url):
    uploads = [client.files.create(file=(f"{i}.jsonl", io.BytesIO(text_line(i, 1).encode())), purpose="batch").id
               for i in range(2)]  # fmt: skip
    listed = [file.id for file in client.files.list(purpose="batch")]
    assert [i for i in listed if i in uploads] == uploads[::-1]
    other = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=create_api_key(fleet.redis_server, name="tenant-c"))
    assert not set(uploads) & {file.id for file in other.files.list()}
    with pytest.raises(openai.NotFoundError):
        other.files.delete(uploads[0])
    assert client.files.delete(uploads[0]).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploads[0])
    assert uploads[0] not in {file.id for file in client.files.list()}
    assert uploads[1] in {file.id for file in client.files.list()}


def test_files_listed_by_purpose_fill_their_page(fleet, gateway_url, jobs):
    """The purpose filter picks before the page is cut: a page is short only where the list ends."""
    client = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=create_api_key(fleet.redis_server, name="tenant-d"))
    uploads = [client.files.create(file=(f"{i}.jsonl", io.BytesIO(text_line(i, 1).encode())), purpose="batch").id
               for i in range(3)]  # fmt: skip
    batch = client.batches.create(input_file_id=uploads[0], endpoint=TEXT, completion_window="24h")
    done = wait_for(client, batch.id, ("completed",))
    newest = client.files.list(limit=1)
    assert [f.id for f in newest.data] == [done.output_file_id] and newest.has_more
    page = client.files.list(purpose="batch", limit=2)
    assert [f.id for f in page.data] == uploads[:0:-1] and page.has_more
    rest = client.files.list(purpose="batch", limit=2, after=uploads[1])
    assert [f.id for f in rest.data] == uploads[:1] and not rest.has_more


def test_unknown_batches_and_files_are_404_and_bad_batches_400(client, jobs):
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-nope")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id="file-x", endpoint="/v1/moderations", completion_window="24h")


def test_a_batch_of_the_responses_api_answers_each_line_with_a_response(client, jobs):
    def line(i: int, body: dict) -> str:
        return json.dumps({"custom_id": f"r-{i}", "method": "POST", "url": "/v1/responses", "body": body})

    good = {"model": MODEL, "instructions": "Answer briefly.", "input": "Name a planet.", "max_output_tokens": 4}
    lines = [line(0, good), line(1, {**good, "previous_response_id": "resp_x"}), line(2, {**good, "input": []})]
    rows = output(client, wait_for(client, submit(client, lines, "/v1/responses").id, ("completed",)))
    response = rows[0]["response"]["body"]
    assert response["object"] == "response" and response["output"][0]["type"] == "message"
    assert response["usage"]["output_tokens"] <= 4 and response["instructions"] == "Answer briefly."
    assert rows[1]["error"] and rows[2]["error"] and rows[1]["response"] is None


def test_a_batch_of_embeddings_answers_each_line_as_the_synchronous_endpoint(client, http, jobs):
    def line(i: int, body: dict) -> str:
        return json.dumps({"custom_id": f"e-{i}", "method": "POST", "url": "/v1/embeddings", "body": body})

    good = {"model": MODEL, "input": ["The cat sat on the mat.", "A dog barked."]}
    lines = [line(0, good), line(1, {**good, "dimensions": 8}), line(2, {"model": MODEL, "input": ""})]
    rows = output(client, wait_for(client, submit(client, lines, "/v1/embeddings").id, ("completed",)))
    body = rows[0]["response"]["body"]
    direct = http.post("/v1/embeddings", json=good).json()
    assert [d["embedding"] for d in body["data"]] == [d["embedding"] for d in direct["data"]]
    assert body["usage"] == direct["usage"]
    assert rows[1]["error"]["message"] and rows[2]["error"] and rows[1]["response"] is None
