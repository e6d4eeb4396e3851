"""Bad input gets the right status and an OpenAI-style error body, never a 500 and never a hang."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import MODEL

HI = [{"role": "user", "content": "hi"}]


def assert_openai_error(reply: httpx.Response, status: int, param: str | None = None) -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def post(http: httpx.Client, body, path: str = "/v1/chat/completions") -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return http.post(path, content=body, headers={"content-type": "application/json"})
    return http.post(path, json=body)


def test_malformed_json_is_400(http):
    error = assert_openai_error(post(http, b'{"model": "x", "messages": ['), 400)
    assert error["code"] == "invalid_json"


def test_unknown_model_is_404(http):
    error = assert_openai_error(post(http, {"model": "no-such-model", "messages": HI}), 404, "model")
    assert error["code"] == "model_not_found"


def test_empty_messages_is_400(http):
    assert_openai_error(post(http, {"model": MODEL, "messages": []}), 400, "messages")


@pytest.mark.parametrize("value", [-1, 0])
def test_non_positive_max_tokens_is_400(http, value):
    assert_openai_error(post(http, {"model": MODEL, "messages": HI, "max_tokens": value}), 400, "max_tokens")


def test_prompt_longer_than_the_context_is_400(http, settings):
    long = "word " * (settings.models[MODEL].max_context + 100)
    body = {"model": MODEL, "messages": [{"role": "user", "content": long}]}
    error = assert_openai_error(post(http, body), 400, "messages")
    assert error["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    ("field", "value"),
    [("functions", []), ("best_of", 2), ("priority", -1), ("no_such_field", 1)],
)
def test_unsupported_parameter_is_400_naming_it(http, field, value):
    error = assert_openai_error(post(http, {"model": MODEL, "messages": HI, field: value}), 400, field)
    assert field in error["message"]


def test_nulls_and_defaults_that_clients_send_explicitly_are_accepted(http):
    """OpenAI's schema makes these nullable (null: the default), and SDKs and proxies send them so."""
    nulls = dict.fromkeys(
        ["temperature", "top_p", "stream", "max_tokens", "stop", "seed", "n", "logprobs", "top_logprobs"]
        + ["presence_penalty", "frequency_penalty", "logit_bias"]
    )
    body = {"model": MODEL, "messages": HI, "max_completion_tokens": 2, "response_format": {"type": "text"}, **nulls,
            "priority": 0}  # fmt: skip
    reply = post(http, body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] <= 2


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]},
        {"model": MODEL, "messages": HI, "temperature": 5},
        {"model": MODEL, "messages": HI, "top_p": 0},
        {"model": MODEL, "messages": HI, "presence_penalty": 2.5},
        {"model": MODEL, "messages": HI, "min_p": 1.5},
        {"model": MODEL, "messages": HI, "n": 0},
        {"model": MODEL, "messages": HI, "n": 17},
        {"model": MODEL, "messages": HI, "logit_bias": {"1": 101}},
        {"model": MODEL, "messages": HI, "logit_bias": {"one": 1}},
        {"model": MODEL, "messages": HI, "logit_bias": {"-1": 1}},
        {"model": MODEL, "messages": HI, "logprobs": True, "top_logprobs": 21},
        {"model": MODEL, "messages": "hello"},
        {"messages": HI},
        [1, 2, 3],
    ],
)
def test_out_of_bounds_fields_are_400(http, body):
    assert_openai_error(post(http, body), 400)


def test_a_logit_bias_token_outside_the_vocabulary_is_400(http):
    body = {"model": MODEL, "messages": HI, "logit_bias": {"49152": 1, "3": -1}}
    assert assert_openai_error(post(http, body), 400, "logit_bias")["code"] == "invalid_value"


def test_top_logprobs_without_logprobs_is_400(http):
    error = assert_openai_error(post(http, {"model": MODEL, "messages": HI, "top_logprobs": 2}), 400, "top_logprobs")
    assert "logprobs" in error["message"]


def test_completion_without_prompt_is_400(http):
    assert_openai_error(post(http, {"model": MODEL}, "/v1/completions"), 400, "prompt")


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=-5)


@pytest.mark.parametrize(
    ("body", "path", "param", "says"),
    [
        ({"model": MODEL, "messages": HI, "stop": ["a"] * 9}, "/v1/chat/completions", "stop", "at most 8"),
        ({"model": MODEL, "messages": HI, "stop": 5}, "/v1/chat/completions", "stop", "string or a valid list"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "/v1/chat/completions",
            "messages.0.content.0.type",
            "'text'",
        ),
        ({"model": MODEL, "prompt": [-1, 5]}, "/v1/completions", "prompt.0", "greater than or equal to 0"),
    ],
)
def test_a_union_fields_error_names_the_field_and_what_is_wrong(http, body, path, param, says):
    """A field that takes a string or a list reports the member the input was meant for, not pydantic's labels."""
    error = assert_openai_error(post(http, body, path), 400, param)
    assert says in error["message"]
    assert "function-after" not in error["message"]


def test_json_the_decoder_gives_up_on_is_invalid_json(http):
    body = b'{"model": "x", "messages": [], "max_tokens": ' + b"9" * 5000 + b"}"
    assert assert_openai_error(post(http, body), 400)["code"] == "invalid_json"


@pytest.mark.parametrize("body", [b"", b"[1, 2]", b'"text"'])
def test_a_body_that_is_not_a_json_object_says_so(http, body):
    assert "must be a JSON object" in assert_openai_error(post(http, body), 400)["message"]


@pytest.mark.parametrize(
    "extra",
    [
        {"min_tokens": 9, "max_tokens": 4},
        {"min_tokens": 2, "response_format": {"type": "json_object"}},
        {"min_tokens": -1},
    ],
)
def test_min_tokens_beyond_max_tokens_or_with_a_grammar_is_400(http, extra):
    assert_openai_error(post(http, {"model": MODEL, "messages": HI, **extra}), 400, "min_tokens")


def test_a_stop_token_id_outside_the_vocabulary_is_400(http):
    reply = post(http, {"model": MODEL, "messages": HI, "stop_token_ids": [2**30]})
    assert assert_openai_error(reply, 400, "stop_token_ids")["code"] == "invalid_value"


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL, "prompt": ["hi"] * 65},
        {"model": MODEL, "prompt": ["hi"] * 5, "n": 16},
        {"model": MODEL, "prompt": ["hi", ""]},
    ],
)
def test_a_batch_of_prompts_beyond_the_bound_or_with_an_empty_one_is_400(http, body):
    assert_openai_error(post(http, body, "/v1/completions"), 400, "prompt")
