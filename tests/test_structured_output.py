"""Structured output: the output matches the request's JSON schema, regular expression, choices or grammar, on
the real model, through the gateway and the openai client; a grammar that does not compile is a 400."""

from __future__ import annotations

import json
import re
import time

import pytest
from llguidance import LLMatcher, grammar_from

from gateway.prompts import PromptTokenizer
from gateway.structured_output import after_thinking, json_grammar
from shared.protocol import InferenceRequest, SamplingParams
from tests.conftest import FRANCE_QUESTION, MODEL
from tests.test_scheduler import scheduler_with
from tests.test_validation import assert_openai_error, post

FRANCE = [{"role": "user", "content": FRANCE_QUESTION}]
ANSWER = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Lyon", "Rome"]}, "sure": {"type": "boolean"}},
    "required": ["city", "sure"],
    "additionalProperties": False,
}
PHONE = r"\d{3}-\d{4}"


def run(scheduler, grammar: str, resume: list[int] = (), **sampling) -> dict:
    scheduler.add(
        InferenceRequest(
            id="r",
            model="m",
            prompt_token_ids=[1, 504, 3575, 282, 4649, 314],
            sampling=SamplingParams(max_tokens=40, grammar=grammar, **sampling),
            deadline=time.time() + 60,
            resume_token_ids=list(resume),
        )
    )
    while scheduler.has_work:
        for event in scheduler.step():
            if event.final:
                return event.final
    raise AssertionError("no final record")


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.5, "seed": 3}])
def test_the_worker_only_chooses_tokens_the_grammar_allows_and_stops_where_it_ends(loaded_model, sampling):
    scheduler = scheduler_with(loaded_model, 16)
    final = run(scheduler, LLMatcher.grammar_from_regex(PHONE), **sampling)
    assert final.finish_reason == "stop" and re.fullmatch(PHONE, final.text), final.text
    final = run(scheduler, json_grammar(ANSWER), **sampling)
    assert final.finish_reason == "stop", final.text
    assert json.loads(final.text)["city"] in ("Paris", "Lyon", "Rome")


def test_a_reclaimed_request_continues_the_grammar_from_the_tokens_already_streamed(loaded_model):
    streamed = loaded_model.tokenizer.encode('{"city": "Ro', add_special_tokens=False)
    final = run(scheduler_with(loaded_model, 16), json_grammar(ANSWER), resume=streamed, temperature=0)
    assert final.finish_reason == "stop" and json.loads(final.text)["city"] == "Rome", final.text


def test_a_grammar_the_worker_cannot_compile_fails_the_request_with_its_reason(loaded_model):
    final = run(scheduler_with(loaded_model, 16), LLMatcher.grammar_from_lark("start: <[99999999]>"))
    assert final.finish_reason == "error" and "Grammar" in final.error


def test_a_json_schema_response_format_gives_json_that_matches_it(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=FRANCE,
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}},
        logprobs=True,
        top_logprobs=5,
    )
    answer = json.loads(reply.choices[0].message.content)
    assert answer["city"] in ("Paris", "Lyon", "Rome") and isinstance(answer["sure"], bool)
    assert reply.choices[0].finish_reason == "stop"
    # Where the grammar allows fewer than five tokens, the others are ruled out: finite, as vLLM clamps them.
    tops = [top.logprob for token in reply.choices[0].logprobs.content for top in token.top_logprobs]
    assert -9999.0 in tops and min(tops) == -9999.0


def test_json_object_mode_streams_a_json_object(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe Paris as a JSON object with two short fields."}],
        max_tokens=200,
        temperature=0,
        stream=True,
        response_format={"type": "json_object"},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop", text
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize(
    ("outputs", "matches"),
    [
        ({"choice": ["Paris", "London", "Berlin"]}, lambda text: text in ("Paris", "London", "Berlin")),
        ({"regex": PHONE}, lambda text: re.fullmatch(PHONE, text)),
        ({"grammar": 'root ::= "The answer is " [0-9]+'}, lambda text: re.fullmatch(r"The answer is \d+", text)),
        ({"json": ANSWER}, lambda text: json.loads(text)["city"] in ("Paris", "Lyon", "Rome")),
    ],
)
def test_vllms_structured_outputs_constrain_completions_too(client, outputs, matches):
    reply = client.completions.create(
        model=MODEL,
        prompt="The capital of France is",
        max_tokens=30,
        temperature=0,
        extra_body={"structured_outputs": outputs},
    )
    assert matches(reply.choices[0].text), reply.choices[0].text


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "frob"}}}},
         "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": "start: <[99999999]>"}}, "structured_outputs"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, "structured_outputs"),
    ],
)  # fmt: skip
def test_a_grammar_that_does_not_compile_or_a_muddled_request_is_400(http, extra, param):
    error = assert_openai_error(post(http, {"model": MODEL, "messages": FRANCE, **extra}), 400, param)
    assert error["code"] == "invalid_value" or "type" in param


@pytest.mark.parametrize(
    "extra",
    [
        {"structured_outputs": {"choice": [""]}},
        {"structured_outputs": {"regex": ""}},
        {"structured_outputs": {"grammar": ""}},
        {"structured_outputs": {"json": 5}},
        {"structured_outputs": {"json_object": False}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}}},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frob"}}}],
         "tool_choice": "required"},
    ],
)  # fmt: skip
def test_odd_grammars_are_answered_never_with_a_500(http, extra):
    reply = post(http, {"model": MODEL, "messages": FRANCE, "max_tokens": 8, **extra})
    assert reply.status_code in (200, 400), reply.text
    if reply.status_code == 400:
        assert_openai_error(reply, 400)


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> PromptTokenizer:
    return PromptTokenizer(model_dir)


@pytest.mark.parametrize(
    "grammar, opened, text, accepted",
    [
        (json_grammar({"enum": ["Paris"]}), "closed", '<think>{"no": 1} </thinking> hmm</think>\n\n"Paris"', True),
        (json_grammar({"enum": ["Paris"]}), "closed", '"Paris"', True),
        (json_grammar({"enum": ["Paris"]}), "closed", "<think>a</think></think>", False),
        (json_grammar({"enum": ["Paris"]}), "open", 'still thinking</think>"Paris"', True),
        (json_grammar({"enum": ["Paris"]}), "open", '"Paris"', False),
        (grammar_from("regex", "[A-Z]+"), "closed", "<think>x</think> XY", True),
        (grammar_from("choice", ["Yes", "No"]), "open", "x</think>No", True),
        (grammar_from("grammar", 'start: "X" y\ny: "Z"'), "open", "x</think>XZ", True),
        (grammar_from("grammar", 'start: "X" y\ny: "Z"'), "open", "x</think>Yes", False),
    ],
)
def test_a_reasoning_models_grammar_shapes_what_follows_its_thinking(tokenizer, grammar, opened, text, accepted):
    matcher = LLMatcher(tokenizer.grammar_tokenizer, after_thinking(grammar, opened), log_level=0)
    followed = all(matcher.consume_token(t) for t in tokenizer.encode(text))
    assert (followed and matcher.is_accepting()) == accepted
