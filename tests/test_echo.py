"""Completions' echo: the prompt before the output, and with logprobs its tokens' log probabilities, in the shape
lm-evaluation-harness reads for loglikelihood tasks (a batch of one token-id prompt, max_tokens 1)."""

from __future__ import annotations

import pytest

from gateway.prompts import PromptTokenizer
from tests.conftest import MODEL
from tests.test_validation import assert_openai_error, post

PROMPT = "The capital of France is Paris"


def test_echo_puts_the_prompt_before_the_output_whole_or_streamed(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert whole.choices[0].text.startswith(PROMPT) and len(whole.choices[0].text) > len(PROMPT)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, echo=True, stream=True))
    assert chunks[0].choices[0].text == PROMPT


def test_echo_with_logprobs_scores_every_prompt_token_as_lm_eval_reads_them(client, model_dir):
    ids = PromptTokenizer(model_dir).encode(PROMPT)
    reply = client.completions.create(model=MODEL, prompt=[ids], max_tokens=1, temperature=0, echo=True, logprobs=1)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(ids) + 1 and "".join(logprobs.tokens).startswith(PROMPT)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert all(len(top) == 1 for top in logprobs.top_logprobs[1:])
    # lm-eval's check: " Paris" is the model's greedy continuation of "The capital of France is".
    paris = logprobs.token_logprobs[len(ids) - 1]
    assert paris == pytest.approx(max(logprobs.top_logprobs[len(ids) - 1].values())) and paris > -3
    assert logprobs.text_offset[1:] == sorted(logprobs.text_offset[1:]) and logprobs.text_offset[0] == 0


def test_every_choice_carries_the_prompts_log_probabilities(client):
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, echo=True, logprobs=0, n=2, seed=1)
    first, second = (c.logprobs for c in reply.choices)
    assert first.token_logprobs[:6] == second.token_logprobs[:6] and first.token_logprobs[0] is None


def test_a_streamed_echo_with_logprobs_opens_each_choice_with_the_prompt_and_its_scores(client):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 1}
    whole = client.completions.create(**body).choices[0]  # the prompt computed, not cached: the same steps
    chunks = [c.choices[0] for c in client.completions.create(**body, stream=True) if c.choices]
    assert chunks[0].text == PROMPT and chunks[0].logprobs.token_logprobs[0] is None
    streamed = [c.logprobs for c in chunks if c.logprobs]
    assert [t for lp in streamed for t in lp.tokens] == whole.logprobs.tokens
    values = [v for lp in streamed for v in lp.token_logprobs]
    assert values[0] is None and values[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-3)
    assert [o for lp in streamed for o in lp.text_offset] == whole.logprobs.text_offset
    assert "".join(c.text for c in chunks) == whole.text
    two = [c.choices[0] for c in client.completions.create(**body, n=2, stream=True) if c.choices]
    for index in (0, 1):
        first = next(c for c in two if c.index == index)
        assert first.text == PROMPT and first.logprobs.tokens[0] == whole.logprobs.tokens[0]


def test_max_tokens_0_with_echo_scores_the_prompt_alone(client):
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    choice = reply.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length" and reply.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[0] is None and len(choice.logprobs.tokens) == reply.usage.prompt_tokens


def test_max_tokens_0_without_echo_is_400(http):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 0}
    assert_openai_error(post(http, body, "/v1/completions"), 400, "max_tokens")


def test_a_one_token_prompt_has_only_its_first_tokens_null(client):
    reply = client.completions.create(model=MODEL, prompt="x", max_tokens=2, echo=True, logprobs=1, n=3, seed=1)
    for choice in reply.choices:
        assert choice.text.startswith("x") and choice.logprobs.tokens[0] == "x"
        assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
