"""Text Generation Inference's own API through the real gateway, Redis and worker, with huggingface_hub's
InferenceClient as code written against TGI calls it (POST / with `stream`), and TGI's /generate routes."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import InferenceClient

from tests.conftest import MODEL


@pytest.fixture(scope="module")
def tgi(gateway_url, api_key) -> InferenceClient:
    return InferenceClient(model=gateway_url, token=api_key)


def test_text_generation_answers_its_input(tgi):
    assert "Paris" in tgi.text_generation("The capital of France is", max_new_tokens=5)


def test_details_give_every_token_the_input_tokens_and_the_finish_reason(tgi, http):
    prompt = "The tallest mountain on Earth is"
    out = tgi.text_generation(prompt, max_new_tokens=5, details=True, decoder_input_details=True, top_n_tokens=2)
    details = out.details
    assert details.finish_reason == "length" and details.generated_tokens == 5
    assert len(details.tokens) == 5 and "".join(t.text for t in details.tokens) == out.generated_text
    assert all(t.logprob <= 0 and isinstance(t.id, int) for t in details.tokens)
    assert all(len(top) == 2 for top in details.top_tokens)
    prompt_ids = http.post("/tokenize", json={"model": MODEL, "prompt": prompt}).json()["tokens"]
    assert [t.id for t in details.prefill] == prompt_ids
    assert details.prefill[0].logprob is None and all(t.logprob <= 0 for t in details.prefill[1:])


def test_a_stream_sends_a_token_an_event_and_the_text_with_the_last(tgi):
    events = list(tgi.text_generation("Once upon a time", max_new_tokens=6, stream=True, details=True))
    assert len(events) == 6 and [e.index for e in events] == list(range(1, 7))
    assert all(e.generated_text is None for e in events[:-1])
    assert events[-1].generated_text == "".join(e.token.text for e in events)
    assert events[-1].details.finish_reason == "length" and events[-1].details.generated_tokens == 6
    assert "".join(tgi.text_generation("Once upon a time there", max_new_tokens=4, stream=True))


def test_truncate_keeps_the_inputs_last_tokens_and_info_describes_the_model(tgi, http):
    out = tgi.text_generation(
        "Ignore all of this. The capital of France is", max_new_tokens=2, details=True, decoder_input_details=True,
        truncate=5,
    )  # fmt: skip
    assert len(out.details.prefill) == 5 and "Ignore" not in "".join(t.text for t in out.details.prefill)
    info = http.get("/info").json()  # InferenceClient.get_endpoint_info asks for the provider hf-inference
    assert info["model_id"] == MODEL and info["max_input_tokens"] < info["max_total_tokens"]


def test_typical_p_samples_only_the_tokens_nearest_the_entropy(tgi):
    # A mass this small keeps one token a step: the same text whatever the seed.
    texts = {tgi.text_generation("A list of fruits:", max_new_tokens=8, typical_p=0.001, seed=s) for s in (1, 2, 3)}
    assert len(texts) == 1


def test_a_stop_sequence_ends_the_text_before_it(tgi):
    out = tgi.text_generation("One, two, three,", max_new_tokens=20, stop=[","], details=True)
    assert out.details.finish_reason == "stop_sequence" and "," not in out.generated_text


def test_return_full_text_and_a_json_grammar(tgi):
    assert tgi.text_generation("Two plus two is", max_new_tokens=3, return_full_text=True).startswith("Two plus two is")
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    text = tgi.text_generation("Two plus two is", max_new_tokens=20, grammar={"type": "json", "value": schema})
    assert set(json.loads(text)) == {"answer"}


def test_the_generate_routes_answer_in_tgis_shapes(http):
    body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 3}}
    whole = http.post("/generate", json=body)
    assert whole.status_code == 200 and set(whole.json()) == {"generated_text"}
    with http.stream("POST", "/generate_stream", json=body) as stream:
        events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
    assert len(events) == 3 and events[-1]["generated_text"] is not None


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": ""},
        {"inputs": "hi", "parameters": {"typical_p": 1.0}},
        {"inputs": "hi", "parameters": {"watermark": True}},
        {"inputs": "hi", "parameters": {"best_of": 2}},
        {"inputs": "hi", "parameters": {"grammar": {"type": "regex"}}},
        {"inputs": "hi", "parameters": {"max_new_tokens": 0}},
        ["not", "an", "object"],
    ],
)
def test_what_tgi_refuses_is_a_422_in_its_error_shape(http, body):
    reply = http.post("/generate", json=body)
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"] and reply.json()["error_type"] == "validation"


def test_a_stream_with_the_inputs_details_is_refused_as_tgi_refuses_it(http):
    parameters = {"details": True, "decoder_input_details": True, "max_new_tokens": 2}
    reply = http.post("/generate_stream", json={"inputs": "hi", "parameters": parameters})
    assert reply.status_code == 422 and "decoder_input_details" in reply.json()["error"]
