"""OpenAI's Responses API through the real gateway, Redis and worker, with the official openai client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import FRANCE_QUESTION, MODEL
from tests.fleet import create_api_key
from tests.test_validation import assert_openai_error


def test_a_response_answers_its_input_with_usage(client):
    response = client.responses.create(model=MODEL, input=FRANCE_QUESTION, max_output_tokens=30, temperature=0)
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed" and response.error is None
    assert "Paris" in response.output_text
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"
    usage = response.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_earlier_output_goes_back_as_input_after_the_instructions(client):
    first = client.responses.create(
        model=MODEL, instructions="Answer in one short sentence.", input="Name a planet.", max_output_tokens=20
    )
    follow_up = [
        {"role": "user", "content": "Name a planet."},
        *[item.model_dump(exclude_none=True) for item in first.output],
        {"role": "user", "content": [{"type": "input_text", "text": "Name another one."}]},
    ]
    second = client.responses.create(
        model=MODEL, instructions="Answer in one short sentence.", input=follow_up, max_output_tokens=20
    )
    assert second.status in ("completed", "incomplete") and second.output_text
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.instructions == "Answer in one short sentence."


def test_a_response_cut_by_max_output_tokens_is_incomplete(client):
    response = client.responses.create(model=MODEL, input="Write a long poem about the sea.", max_output_tokens=3)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3


def test_a_streamed_response_sends_the_typed_events_in_order(client):
    events = list(
        client.responses.create(model=MODEL, input=FRANCE_QUESTION, max_output_tokens=30, temperature=0, stream=True)
    )
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"
    ]  # fmt: skip
    assert kinds[-4:] == [
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"
    ]  # fmt: skip
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    completed = events[-1].response
    text = "".join(event.delta for event in events[4:-4])
    assert text == completed.output_text == events[-4].text
    assert completed.usage.output_tokens > 0


def test_the_clients_stream_helper_assembles_the_final_response(client):
    with client.responses.stream(model=MODEL, input=FRANCE_QUESTION, max_output_tokens=30, temperature=0) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text and final.status == "completed"


def test_a_json_schema_text_format_gives_json_that_matches(client):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    response = client.responses.create(
        model=MODEL, input=FRANCE_QUESTION, max_output_tokens=60, temperature=0,
        text={"format": {"type": "json_schema", "name": "place", "schema": schema, "strict": True}},
    )  # fmt: skip
    assert set(json.loads(response.output_text)) == {"city", "country"}
    assert response.text.format.type == "json_schema"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tool_choice"),
        ({"tools": [{"type": "web_search"}], "tool_choice": "required"}, None),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"include": ["reasoning.encrypted_content"]}, None),
        ({"no_such_field": 1}, "no_such_field"),
        ({"input": []}, "input"),
        ({"input": [{"role": "wizard", "content": "hi"}]}, None),
        ({"input": [{"role": "assistant", "content": "hi"}]}, "input"),
        ({"max_output_tokens": 100_000}, "max_output_tokens"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}}, "text.format"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ],
)
def test_what_a_text_server_cannot_do_is_a_400_naming_it(http, extra, param):
    body = {"model": MODEL, "input": "hi", **extra}
    assert_openai_error(http.post("/v1/responses", json=body), 400, param)


def test_an_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input="hi")


def test_a_stored_response_is_read_back_continued_and_deleted(client):
    instructions = "Answer in one short sentence."
    first = client.responses.create(
        model=MODEL, instructions=instructions, input="Name a planet.", max_output_tokens=12
    )
    assert first.store is True
    assert client.responses.retrieve(first.id).output_text == first.output_text
    second = client.responses.create(
        model=MODEL, instructions=instructions, previous_response_id=first.id, input="Name another one.",
        max_output_tokens=12,
    )  # fmt: skip
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens, "the first turn came too"
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens, "and from the prefix cache"
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as gone:
        client.responses.create(model=MODEL, previous_response_id=first.id, input="And another?")
    assert gone.value.body["param"] == "previous_response_id"


def test_a_streamed_response_is_stored_and_one_with_store_false_is_not(client):
    events = list(client.responses.create(model=MODEL, input="Name a colour.", max_output_tokens=8, stream=True))
    streamed = events[-1].response
    assert client.responses.retrieve(streamed.id).output_text == streamed.output_text
    kept_out = client.responses.create(model=MODEL, input="Name a colour.", max_output_tokens=8, store=False)
    assert kept_out.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept_out.id)


def test_a_stored_response_is_invisible_to_another_key(fleet, gateway_url, client, auth_headers):
    response = client.responses.create(model=MODEL, input="Name a fruit.", max_output_tokens=4)
    other = {"Authorization": f"Bearer {create_api_key(fleet.redis_server, name='responses-tenant')}"}
    path = f"{gateway_url}/v1/responses/{response.id}"
    assert httpx.get(path, headers=other, timeout=10).status_code == 404
    assert httpx.delete(path, headers=other, timeout=10).status_code == 404
    continued = {"model": MODEL, "input": "More.", "previous_response_id": response.id}
    assert httpx.post(f"{gateway_url}/v1/responses", json=continued, headers=other, timeout=30).status_code == 404
    assert httpx.get(path, headers=auth_headers, timeout=10).status_code == 200


def test_log_probabilities_come_with_the_output_when_included(client):
    options = {"model": MODEL, "input": FRANCE_QUESTION, "max_output_tokens": 6, "temperature": 0}
    wanted = {"include": ["message.output_text.logprobs"], "top_logprobs": 2}
    part = client.responses.create(**options, **wanted).output[0].content[0]
    assert part.logprobs and "".join(lp.token for lp in part.logprobs) == part.text
    assert all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in part.logprobs)
    assert not client.responses.create(**options).output[0].content[0].logprobs, "only when included"
    events = list(client.responses.create(**options, **wanted, stream=True))
    streamed = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    assert [lp.token for lp in streamed] == [lp.token for lp in done.logprobs]


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


def test_a_named_function_makes_the_output_its_call_and_its_result_goes_back(client):
    question = {"role": "user", "content": "What is the weather in Paris?"}
    named = {"type": "function", "name": "get_weather"}
    called = client.responses.create(model=MODEL, input=[question], tools=[WEATHER], tool_choice=named, temperature=0)
    (call,) = called.output
    assert call.type == "function_call" and call.name == "get_weather" and called.status == "completed"
    assert set(json.loads(call.arguments)) == {"city"}
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 C."}
    answer = client.responses.create(
        model=MODEL, input=[question, call.model_dump(exclude_none=True), result], tools=[WEATHER],
        tool_choice="none", max_output_tokens=20,
    )  # fmt: skip
    assert answer.output[0].type == "message" and answer.output_text
    assert answer.usage.input_tokens > called.usage.input_tokens


def test_required_calls_stream_as_the_apis_function_call_events(client):
    with client.responses.stream(
        model=MODEL, input="Weather in Rome and in Oslo?", tools=[WEATHER], tool_choice="required", temperature=0,
        max_output_tokens=80,
    ) as stream:  # fmt: skip
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.output_text.delta" not in kinds and "response.function_call_arguments.done" in kinds
    assert final.output and all(item.type == "function_call" and item.name == "get_weather" for item in final.output)


def test_a_stored_responses_input_items_are_listed_newest_first_page_by_page(client):
    said = [
        {"role": "user", "content": "Name a planet."},
        {"role": "assistant", "content": "Mars."},
        {"role": "user", "content": [{"type": "input_text", "text": "Another one?"}]},
    ]
    response = client.responses.create(model=MODEL, input=said, max_output_tokens=3)
    newest_first = client.responses.input_items.list(response.id)
    assert [item.role for item in newest_first.data] == ["user", "assistant", "user"]
    assert newest_first.data[0].content[0].text == "Another one?" and not newest_first.has_more
    first = client.responses.input_items.list(response.id, limit=2, order="asc")
    assert [item.content[0].text for item in first.data] == ["Name a planet.", "Mars."] and first.has_more
    rest = client.responses.input_items.list(response.id, limit=2, order="asc", after=first.data[-1].id)
    assert [item.content[0].text for item in rest.data] == ["Another one?"] and not rest.has_more
    assert len(list(client.responses.input_items.list(response.id, limit=1))) == 3, "the client pages through all"
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_unknown")
