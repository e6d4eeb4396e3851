"""Text is normalised and cleaned before it is tokenized; malformed text, bad message orders and denied
prompts are refused with a 400."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import DENIED, MODEL
from tests.test_validation import assert_openai_error

CLEAN = "The capital of France is"


def prompt_tokens(http, prompt: str) -> int:
    reply = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0})
    assert reply.status_code == 200, reply.text
    return reply.json()["usage"]["prompt_tokens"]


def test_control_characters_are_stripped(http):
    assert prompt_tokens(http, "The\x00 capital\x07 of\x1b France\x7f is") == prompt_tokens(http, CLEAN)


def test_text_is_normalised_to_nfc(http):
    assert prompt_tokens(http, "Un caf\u0065\u0301 noir") == prompt_tokens(http, "Un caf\u00e9 noir")


def test_a_lone_surrogate_is_400(http):
    body = '{"model": "' + MODEL + '", "prompt": "bad \\ud800 text"}'
    reply = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert assert_openai_error(reply, 400)["code"] == "invalid_encoding"


@pytest.mark.parametrize(
    "roles",
    [["assistant", "user"], ["user", "system", "user"], ["user", "assistant"], ["system"], ["developer", "assistant"]],
)
def test_roles_out_of_order_are_400(http, roles):
    messages = [{"role": role, "content": "hi"} for role in roles]
    reply = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
    assert assert_openai_error(reply, 400, "messages")["code"] == "invalid_message_order"


def test_leading_system_messages_and_alternating_turns_are_accepted(http):
    roles = ["system", "developer", "user", "assistant", "user"]
    messages = [{"role": role, "content": "Say yes."} for role in roles]
    reply = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 2})
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize("prompt", ["Please OPEN   Sesame now", "open\u0000 sesame"])
def test_a_denied_pattern_is_400_with_a_neutral_message(strict_gateway, auth_headers, prompt):
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}]}
    reply = httpx.post(f"{strict_gateway}/v1/chat/completions", json=body, headers=auth_headers, timeout=30)
    error = assert_openai_error(reply, 400)
    assert error["code"] == "content_policy"
    assert "sesame" not in error["message"].lower() and DENIED not in error["message"]
