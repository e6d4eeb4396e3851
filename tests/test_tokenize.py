"""vLLM's /tokenize and /detokenize: the ids a request's prompt becomes, without running the model."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import FRANCE_QUESTION, MODEL
from tests.test_validation import assert_openai_error

FRANCE = [{"role": "user", "content": FRANCE_QUESTION}]


@pytest.mark.parametrize("prefix", ["", "/v1"])
def test_a_prompts_ids_are_the_ones_a_completion_counts_and_decode_back(http, client, prefix):
    prompt = "The capital of France is"
    reply = http.post(f"{prefix}/tokenize", json={"model": MODEL, "prompt": prompt})
    assert reply.status_code == 200, reply.text
    tokenized = reply.json()
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    assert tokenized["count"] == len(tokenized["tokens"]) == completion.usage.prompt_tokens
    assert tokenized["max_model_len"] > tokenized["count"]
    back = http.post(f"{prefix}/detokenize", json={"model": MODEL, "tokens": tokenized["tokens"]})
    assert back.json() == {"prompt": prompt}


def test_messages_are_tokenized_through_the_chat_template_as_a_chat_request_is(http, client):
    tokenized = http.post("/tokenize", json={"model": MODEL, "messages": FRANCE}).json()
    chat = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=1)
    assert tokenized["count"] == chat.usage.prompt_tokens
    text = http.post("/detokenize", json={"model": MODEL, "tokens": tokenized["tokens"]}).json()["prompt"]
    assert FRANCE_QUESTION in text and text.startswith("<|im_start|>")


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"model": MODEL}, 400, "prompt"),
        ("/tokenize", {"model": MODEL, "prompt": "hi", "messages": FRANCE}, 400, "prompt"),
        ("/tokenize", {"model": "no-such-model", "prompt": "hi"}, 404, "model"),
        ("/detokenize", {"model": MODEL, "tokens": [49152]}, 400, "tokens"),
        ("/detokenize", {"model": MODEL, "tokens": "hi"}, 400, "tokens"),
    ],
)
def test_bad_tokenize_requests_get_openai_errors(http, path, body, status, param):
    assert_openai_error(http.post(path, json=body), status, param)


def test_tokenize_needs_an_api_key_outside_v1_too(gateway_url):
    for path in ("/tokenize", "/v1/tokenize", "/detokenize"):
        reply = httpx.post(f"{gateway_url}{path}", json={"model": MODEL, "prompt": "hi"}, timeout=10)
        assert reply.status_code == 401, path


def test_a_started_answer_is_continued_where_its_text_ends(http, client):
    started = [*FRANCE, {"role": "assistant", "content": "The capital of France is"}]
    options = {"add_generation_prompt": False, "continue_final_message": True}
    tokenized = http.post("/tokenize", json={"model": MODEL, "messages": started, **options}).json()
    text = http.post("/detokenize", json={"model": MODEL, "tokens": tokenized["tokens"]}).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\nThe capital of France is")
    reply = client.chat.completions.create(
        model=MODEL, messages=started, temperature=0, max_tokens=4, extra_body=options
    )
    assert reply.usage.prompt_tokens == tokenized["count"]
    assert "Paris" in reply.choices[0].message.content


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"continue_final_message": True}, "continue_final_message"),
        ({"add_generation_prompt": False}, "messages"),
        ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"not a name": 1}}, None),
    ],
)
def test_template_options_that_do_not_fit_the_messages_are_400(http, extra, param):
    started = [*FRANCE, {"role": "assistant", "content": "The capital"}]
    reply = http.post("/v1/chat/completions", json={"model": MODEL, "messages": started, **extra})
    assert_openai_error(reply, 400, param)


def test_chat_template_kwargs_the_template_does_not_use_change_nothing(http, client):
    plain = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=1)
    with_kwargs = client.chat.completions.create(
        model=MODEL, messages=FRANCE, max_tokens=1, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    assert with_kwargs.usage.prompt_tokens == plain.usage.prompt_tokens
