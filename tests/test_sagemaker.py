"""SageMaker's routes, as vLLM and TGI serve them: GET /ping, and POST /invocations, whose body's shape picks the
API (chat, completions or TGI's generate), through the real gateway and worker."""

from __future__ import annotations

import json

import httpx

from tests.conftest import MODEL
from tests.test_validation import assert_openai_error


def test_ping_answers_without_a_key(gateway_url):
    assert httpx.get(f"{gateway_url}/ping").status_code == 200


def test_invocations_answer_chat_completion_and_tgi_bodies_without_a_model(http):
    chat = http.post("/invocations", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert chat.status_code == 200 and chat.json()["object"] == "chat.completion", chat.text
    assert chat.json()["model"] == MODEL
    text = http.post("/invocations", json={"prompt": "The capital of France is", "max_tokens": 2, "temperature": 0})
    assert text.json()["object"] == "text_completion" and "Paris" in text.json()["choices"][0]["text"]
    tgi = http.post("/invocations", json={"inputs": "The capital of France is", "parameters": {"max_new_tokens": 2}})
    assert tgi.status_code == 200 and "Paris" in tgi.json()["generated_text"]
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
    with http.stream("POST", "/invocations", json=body) as stream:
        lines = [line[5:].strip() for line in stream.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "[DONE]" and json.loads(lines[0])["object"] == "chat.completion.chunk"


def test_invocations_refuse_other_bodies_and_need_a_key_where_keys_are_on(http, gateway_url):
    assert_openai_error(http.post("/invocations", json={"question": "?"}), 400)
    assert_openai_error(http.post("/invocations", json={"messages": [], "max_tokens": 2}), 400, "messages")
    assert_openai_error(http.post("/invocations", json={"prompt": "x", "model": "nope"}), 404, "model")
    assert httpx.post(f"{gateway_url}/invocations", json={"prompt": "x"}).status_code == 401
