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
    [("logit_bias", {"1": 5}), ("tools", []), ("n", 2), ("presence_penalty", 0.5), ("no_such_field", 1)],
)
def test_unsupported_parameter_is_400_naming_it(http, field, value):
    error = assert_openai_error(post(http, {"model": MODEL, "messages": HI, field: value}), 400, field)
    assert field in error["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]},
        {"model": MODEL, "messages": HI, "temperature": 5},
        {"model": MODEL, "messages": HI, "top_p": 0},
        {"model": MODEL, "messages": "hello"},
        {"messages": HI},
        [1, 2, 3],
    ],
)
def test_out_of_bounds_fields_are_400(http, body):
    assert_openai_error(post(http, body), 400)


def test_completion_without_prompt_is_400(http):
    assert_openai_error(post(http, {"model": MODEL}, "/v1/completions"), 400, "prompt")


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=-5)
