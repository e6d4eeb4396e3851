"""A reasoning model's thinking apart from its answer (vLLM's --reasoning-parser): `reasoning` and `content` in chat
and Responses, whole and streamed; a grammar shapes the answer after the thinking. The default model does not think,
so a regex makes it write <think>...</think> first (the grammar shaping the thinking too), or a chat template opens
the thinking in the prompt, as DeepSeek-R1's does, and a logit bias makes it close it."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from gateway import reasoning
from tests.conftest import MODEL

THINKING = r"[a-z ]{5,30}"
ANSWER = r"[A-Z][a-z ]{2,30}"
FORCED = {"structured_outputs": {"regex": f"<think>{THINKING}</think>{ANSWER}"}}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def thinking_url(fleet, model_dir) -> str:
    """A gateway that serves the default model (the shared worker's) with a reasoning parser, grammars shaping the
    output from its first token."""
    models = json.dumps({MODEL: {"reasoning_parser": "deepseek_r1", "structured_outputs_in_reasoning": True}})
    return fleet.gateway(LLMFLEET_MODELS=models, LLMFLEET_PROTECTION__AUTH="open").url


@pytest.fixture(scope="module")
def thinking(thinking_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{thinking_url}/v1", api_key="unused", max_retries=0, timeout=120)


OPENING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
"""DeepSeek-R1's way: the generation prompt opens the thinking (the default model then never closes it)."""


@pytest.fixture(scope="module")
def opening(fleet, model_dir) -> openai.OpenAI:
    models = json.dumps({MODEL: {"reasoning_parser": "deepseek_r1", "chat_template": OPENING_TEMPLATE}})
    url = fleet.gateway(LLMFLEET_MODELS=models, LLMFLEET_PROTECTION__AUTH="open").url
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_the_thinking_comes_apart_from_the_answer(thinking, client):
    plain = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=80, temperature=0, extra_body=FORCED
    ).choices[0]
    reply = thinking.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=80, temperature=0, extra_body=FORCED
    ).choices[0]
    assert reply.finish_reason == "stop", plain.message.content
    assert re.fullmatch(THINKING, reply.message.reasoning) and re.fullmatch(ANSWER, reply.message.content)
    assert plain.message.content == f"<think>{reply.message.reasoning}</think>{reply.message.content}"
    assert not hasattr(plain.message, "reasoning")


def test_a_stream_sends_the_same_thinking_and_answer_in_their_own_fields(thinking):
    whole = thinking.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=80, temperature=0, extra_body=FORCED
    ).choices[0]
    deltas = [
        c.choices[0].delta
        for c in thinking.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=80, temperature=0, extra_body=FORCED, stream=True
        )
    ]
    streamed = "".join(getattr(d, "reasoning", None) or "" for d in deltas)
    answered = "".join(d.content or "" for d in deltas)
    assert (streamed, answered) == (whole.message.reasoning, whole.message.content)
    assert not any("<think>" in (d.content or "") + (getattr(d, "reasoning", None) or "") for d in deltas)


def test_include_reasoning_false_leaves_the_thinking_out_whole_and_streamed(thinking):
    asked = {"model": MODEL, "messages": QUESTION, "max_tokens": 80, "temperature": 0}
    hidden = {**FORCED, "include_reasoning": False}
    whole = thinking.chat.completions.create(**asked, extra_body=FORCED).choices[0]
    reply = thinking.chat.completions.create(**asked, extra_body=hidden).choices[0]
    assert reply.message.content == whole.message.content and getattr(reply.message, "reasoning", None) is None
    deltas = [c.choices[0].delta for c in thinking.chat.completions.create(**asked, extra_body=hidden, stream=True)]
    assert "".join(d.content or "" for d in deltas) == whole.message.content
    assert not any(getattr(d, "reasoning", None) for d in deltas)


def test_a_prompt_that_opens_the_thinking_makes_the_output_thinking(opening):
    reply = opening.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0).choices[0]
    assert reply.message.reasoning and reply.message.content is None


CLOSING = {str(token): 100 for token in (9617, 17400, 46)}
"""A logit bias that makes the default model write `</think>` ("</", "think", ">") while it thinks: none of them is
in the answer's grammar then."""


CITY = {"type": "json_schema", "json_schema": {"name": "city", "schema": {"enum": ["Paris", "Rome"]}}}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]},
    },
}


def test_a_grammar_shapes_the_answer_after_the_thinking(opening):
    ask = {"model": MODEL, "messages": QUESTION, "temperature": 0}
    cut = opening.chat.completions.create(**ask, max_tokens=8, response_format=CITY).choices[0]
    assert cut.finish_reason == "length" and cut.message.reasoning and cut.message.content is None
    answer = opening.chat.completions.create(**ask, max_tokens=40, response_format=CITY, logit_bias=CLOSING).choices[0]
    assert answer.finish_reason == "stop" and answer.message.reasoning
    assert json.loads(answer.message.content) in ("Paris", "Rome")
    deltas = [
        c.choices[0].delta
        for c in opening.chat.completions.create(
            **ask, max_tokens=40, response_format=CITY, logit_bias=CLOSING, stream=True
        )
        if c.choices
    ]
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == answer.message.reasoning
    assert "".join(d.content or "" for d in deltas) == answer.message.content
    calling = {**ask, "max_tokens": 60, "tools": [WEATHER], "tool_choice": "required", "logit_bias": CLOSING}
    called = opening.chat.completions.create(**calling).choices[0]
    assert called.finish_reason == "tool_calls" and called.message.reasoning and called.message.content is None
    (call,) = called.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    (last,) = [c.choices[0].delta for c in opening.chat.completions.create(**calling, stream=True) if c.choices][-2:-1]
    assert (
        last.reasoning == called.message.reasoning and last.tool_calls[0].function.arguments == call.function.arguments
    )


def test_a_response_sent_back_as_history_is_taken_with_its_thinking(thinking):
    first = thinking.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=80, temperature=0, extra_body=FORCED
    ).choices[0]
    history = [*QUESTION, first.message, {"role": "user", "content": "And of Italy?"}]
    second = thinking.chat.completions.create(model=MODEL, messages=history, max_tokens=4, temperature=0)
    assert second.choices[0].finish_reason == "length"
    refused = httpx.post(
        f"{thinking.base_url}chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi", "reasoning": "no"}]},
    )
    assert refused.status_code == 400 and "Only assistant messages" in refused.json()["error"]["message"]


def test_the_responses_api_gives_the_thinking_as_a_reasoning_item(opening):
    chat = opening.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0).choices[0]
    response = opening.responses.create(model=MODEL, input=QUESTION, max_output_tokens=8, temperature=0)
    thought, answer = response.output
    assert thought.type == "reasoning" and thought.content[0].text == chat.message.reasoning
    assert answer.type == "message" and response.output_text == ""
    events = list(
        opening.responses.create(model=MODEL, input=QUESTION, max_output_tokens=8, temperature=0, stream=True)
    )
    (done,) = [e for e in events if e.type == "response.reasoning_text.done"]
    assert done.text == chat.message.reasoning and done.output_index == 0
    assert [e.output_index for e in events if e.type == "response.output_text.done"] == [1]
    # The reasoning item goes back with the conversation, as the API asks of clients.
    history = [*QUESTION, *(item.model_dump(exclude_none=True) for item in response.output)]
    again = opening.responses.create(
        model=MODEL, input=[*history, {"role": "user", "content": "Why?"}], max_output_tokens=4, temperature=0
    )
    assert again.status == "incomplete"


@pytest.mark.parametrize(
    "opened, pieces, expected",
    [
        ("closed", ["<th", "ink>ab", "c</th", "ink>\n", "Paris"], ("abc", "\nParis")),
        ("closed", ["  ", "<think>", "x"], ("x", "")),
        ("closed", ["<", "b>bold"], ("", "<b>bold")),
        ("open", ["still ", "thinking </thi"], ("still thinking </thi", "")),
        ("open", ["a</think>b<think>c"], ("a", "b<think>c")),
    ],
)
def test_a_tag_cut_between_deltas_is_held_back_until_it_is_whole(opened, pieces, expected):
    splitter = reasoning.Splitter(opened)
    sent = [splitter.feed(piece) for piece in pieces] + [splitter.finish()]
    assert ("".join(r for r, _ in sent), "".join(c for _, c in sent)) == expected
    assert reasoning.split(opened, "".join(pieces)) == tuple(part or None for part in expected)
