"""Tool calls where the request names the function or requires a call: the output is the call's JSON, handed back
as OpenAI's tool_calls, whole or streamed, through the openai client; tool results go back in as messages. With a
model's tool-call parser, tool_choice 'auto': the calls the output announces (here a regex makes the default model
write one in each parser's format)."""

from __future__ import annotations

import json
import re

import openai
import pytest

from gateway import tool_call_formats, tool_calls
from tests.conftest import MODEL
from tests.test_validation import assert_openai_error, post

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "London"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now."}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_a_named_function_is_called_with_arguments_that_match_its_parameters(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=40,
        temperature=0,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "London")


@pytest.mark.parametrize("stream", [False, True])
def test_a_required_call_is_one_of_the_tools_whole_or_streamed(client, stream):
    kwargs = dict(
        model=MODEL, messages=ASK, max_tokens=60, temperature=0, tools=[WEATHER, TIME], tool_choice="required",
        parallel_tool_calls=False,
    )  # fmt: skip
    if stream:
        calls, reason = {}, None
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            for choice in chunk.choices:
                assert not choice.delta.content
                for delta in choice.delta.tool_calls or []:
                    calls[delta.index] = delta
                reason = choice.finish_reason or reason
        calls = [calls[i] for i in sorted(calls)]
    else:
        reply = client.chat.completions.create(**kwargs)
        calls, reason = reply.choices[0].message.tool_calls, reply.choices[0].finish_reason
    assert reason == "tool_calls" and len(calls) == 1
    assert calls[0].function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(calls[0].function.arguments), dict)


def test_tool_results_go_back_as_messages_and_the_model_answers_in_text(client):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees."},
    ]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, temperature=0, tools=[WEATHER], tool_choice="none"
    )
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [WEATHER]}, "tool_choice"),  # 'auto', the default with tools
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "has spaces"}}], "tool_choice": "none"}, None),
        ({"messages": ASK + [{"role": "tool", "tool_call_id": "x", "content": "?"}]}, "messages"),
        ({"messages": [{"role": "user", "content": None}]}, "messages"),
    ],
)  # fmt: skip
def test_tool_requests_that_cannot_be_served_are_400(http, extra, param):
    assert_openai_error(post(http, {"model": MODEL, "messages": ASK, **extra}), 400, param)


def test_a_call_cut_short_by_a_stop_string_comes_back_as_text(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=60, temperature=0, tools=[WEATHER], tool_choice="required", stop=["name"]
    )
    assert reply.choices[0].message.content == '[{"' and not reply.choices[0].message.tool_calls


ANNOUNCED = {
    "hermes": (
        r'Let me check\.<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,8}"\}\}\n'
        r"</tool_call>",
        "Let me check.",
    ),
    "llama3_json": (r'\{"name": "get_weather", "parameters": \{"city": "[A-Z][a-z]{2,8}"\}\}', None),
    "pythonic": (r'\[get_weather\(city="[A-Z][a-z]{2,8}"\)\]', None),
    # Mistral's v11 form (its markers plain text to this model's tokenizer, special tokens to Mistral's).
    "mistral": (r'\[TOOL_CALLS\]get_weather\[ARGS\]\{"city": "[A-Z][a-z]{2,8}"\}', None),
}
"""Each parser's format, as a regex that makes the default model announce a call in it, and the text before it."""


@pytest.fixture(scope="module", params=sorted(ANNOUNCED))
def parsing(request, fleet, model_dir) -> tuple[str, openai.OpenAI]:
    """A gateway that serves the default model (the shared worker's) with a tool-call parser."""
    models = json.dumps({MODEL: {"tool_call_parser": request.param}})
    url = fleet.gateway(LLMFLEET_MODELS=models, LLMFLEET_PROTECTION__AUTH="open").url
    return request.param, openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def ask_auto(client: openai.OpenAI, max_tokens: int = 60, **extra):
    return client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=max_tokens, temperature=0, tools=[WEATHER, TIME], tool_choice="auto",
        **extra,
    )  # fmt: skip


def test_with_a_parser_auto_hands_back_the_calls_the_output_announces(parsing):
    parser, client = parsing
    regex, before = ANNOUNCED[parser]
    forced = {"structured_outputs": {"regex": regex}}
    choice = ask_auto(client, extra_body=forced).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == before
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and re.fullmatch(
        r"[A-Z][a-z]{2,8}", json.loads(call.function.arguments)["city"]
    )
    deltas = [c.choices[0] for c in ask_auto(client, extra_body=forced, stream=True) if c.choices]
    assert "".join(d.delta.content or "" for d in deltas) == (before or "")
    (streamed,) = [d.delta.tool_calls for d in deltas if d.delta.tool_calls]
    assert streamed[0].function.arguments == call.function.arguments and deltas[-1].finish_reason == "tool_calls"


def test_with_a_parser_an_output_that_announces_no_call_is_its_answer(parsing):
    _, client = parsing
    choice = ask_auto(client, max_tokens=5).choices[0]
    assert choice.finish_reason == "length" and choice.message.content and not choice.message.tool_calls


def test_only_the_mistral_parser_keeps_the_outputs_special_tokens_in_its_text(parsing):
    """Its v11 calls are special tokens and names; the other formats' markers are dropped with the special tokens."""
    parser, client = parsing
    content = ask_auto(client, max_tokens=2, logit_bias={1: 100}).choices[0].message.content  # 1: <|im_start|>
    assert content == ("<|im_start|><|im_start|>" if parser == "mistral" else "")


@pytest.mark.parametrize(
    "parser, text, expected",
    [
        ("hermes", '<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>', (None, [("a", '{"x": 1}')])),
        ("hermes", 'Sure.\n<tool_call>\n{"name": "a", "arguments": "{}"}\n</tool_call><tool_call>{"name": "b"}'
         "</tool_call>", ("Sure.", [("a", "{}"), ("b", "{}")])),
        ("hermes", "<tool_call>{not json}</tool_call>", None),
        ("hermes", '<tool_call>{"arguments": {}}</tool_call>', None),
        ("hermes", "no call here", None),
        ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {"x": "é"}}', (None, [("a", '{"x": "é"}')])),
        ("llama3_json", ' {"name": "a", "arguments": {}}; {"name": "b", "parameters": {"y": [1]}}\n',
         (None, [("a", "{}"), ("b", '{"y": [1]}')])),
        ("llama3_json", '{"name": "a", "parameters": {}} and then some', None),
        ("llama3_json", '{"x": 1}', None),
        ("llama3_json", 'The call is {"name": "a"}', None),
        ("pythonic", '[a(x=1, y="z", on=true, off=None), b()]',
         (None, [("a", '{"x": 1, "y": "z", "on": true, "off": null}'), ("b", "{}")])),
        ("pythonic", "[a(1)]", None),
        ("pythonic", "[a(x=f())]", None),
        ("pythonic", "[a(**k)]", None),
        ("pythonic", "[1] A list.", None),
        ("pythonic", "[]", None),
        ("mistral", '[TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}}]', (None, [("a", '{"x": 1}')])),
        ("mistral", '[{"name": "a", "arguments": {"x": 1}}, {"name": "b"}]', (None, [("a", '{"x": 1}'), ("b", "{}")])),
        ("mistral", "[1] A list.", None),
        ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', (None, [("get_weather", '{"city": "Paris"}')])),
        ("mistral", '[TOOL_CALLS]a[ARGS]{"x": 1}[TOOL_CALLS]b[CALL_ID]abc123XYZ[ARGS]{}',
         (None, [("a", '{"x": 1}'), ("b", "{}")])),
        ("mistral", '[TOOL_CALLS]a{"x": [1]}', (None, [("a", '{"x": [1]}')])),
        ("mistral", "[TOOL_CALLS]a[ARGS]not json", None),
        ("mistral", "[TOOL_CALLS]The answer.", None),
    ],
)  # fmt: skip
def test_announced_calls_are_read_from_the_text_or_it_stays_text(parser, text, expected):
    assert tool_calls.announced(tool_call_formats.FORMATS[parser], text) == expected


def sent(parser: str, pieces: list[str]) -> tuple[list[str], str]:
    announcing = tool_calls.Announcing(tool_call_formats.FORMATS[parser])
    return [announcing.feed(piece) for piece in pieces], announcing.held


def test_a_streamed_answer_is_held_back_only_from_where_a_call_may_begin():
    pieces = ["Let me", " check <", "tool_", "call>{...}", "</tool_call>"]
    assert sent("hermes", pieces) == (["Let me", " check ", "", "", ""], "<tool_call>{...}</tool_call>")
    assert sent("hermes", ["a < b"]) == (["a < b"], "")
    cut = tool_calls.Announcing(tool_call_formats.FORMATS["hermes"])
    assert (cut.feed("see <tool"), cut.finish("s")) == ("see ", "<tools"), "no call came of it: all of it, at the end"
    assert sent("llama3_json", [" ", '{"na', 'me"']) == (["", "", ""], ' {"name"')
    assert sent("llama3_json", ["<|py", "thon_tag|>{"]) == (["", ""], "<|python_tag|>{")
    assert sent("llama3_json", ["\n", "The {", "x}"]) == (["", "\nThe {", "x}"], "")
    assert sent("pythonic", ["Paris", " [1]"]) == (["Paris", " [1]"], "")
