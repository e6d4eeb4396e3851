"""vLLM's extra sampling and output parameters (sent through the openai client's extra_body, as vLLM's users send
them) through the whole path: allowed tokens, bad words, stop strings kept, prompts truncated, the prompt's log
probabilities, tokens named by id, usage in every streamed chunk; and OpenAI's chat parameters that leave the
output as it is."""

from __future__ import annotations

import httpx
import openai
import pytest

from gateway.prompts import PromptTokenizer
from tests.conftest import ALIAS, MODEL
from tests.test_validation import assert_openai_error, post

PROMPT = "The capital of France is"
GREEDY = {"model": MODEL, "temperature": 0}


def _ids(logprobs) -> list[int]:
    """The token ids of a completion's legacy logprobs, named `token_id:<id>`."""
    return [int(token.removeprefix("token_id:")) for token in logprobs.tokens]


def test_allowed_token_ids_are_all_that_is_generated(client, model_dir):
    allowed = PromptTokenizer(model_dir).encode(" one two three four, five")
    reply = client.completions.create(
        prompt=PROMPT, max_tokens=8, logprobs=0, extra_body={"allowed_token_ids": allowed,
        "return_tokens_as_token_ids": True}, **GREEDY,
    )  # fmt: skip
    generated = _ids(reply.choices[0].logprobs)
    assert len(generated) == 8 and set(generated) <= set(allowed)


def test_a_bad_word_is_never_generated(client, model_dir):
    tokenizer = PromptTokenizer(model_dir)
    first = client.completions.create(prompt=PROMPT, max_tokens=3, **GREEDY).choices[0].text
    word = first.split()[0]  # " Paris"
    reply = client.completions.create(
        prompt=PROMPT, max_tokens=12, logprobs=0,
        extra_body={"bad_words": [word], "return_tokens_as_token_ids": True}, **GREEDY,
    )  # fmt: skip
    generated = _ids(reply.choices[0].logprobs)
    for banned in (tokenizer.encode(word, special_tokens=False), tokenizer.encode(" " + word, special_tokens=False)):
        windows = [generated[i : i + len(banned)] for i in range(len(generated))]
        assert banned not in windows, (word, reply.choices[0].text)


def test_the_stop_string_stays_at_the_end_when_asked(client):
    body = {"prompt": "One, two, three,", "max_tokens": 20, "stop": [" four"], **GREEDY}
    plain = client.completions.create(**body).choices[0]
    kept = client.completions.create(**body, extra_body={"include_stop_str_in_output": True}).choices[0]
    assert plain.finish_reason == kept.finish_reason == "stop" and kept.stop_reason == " four"
    assert kept.text == plain.text + " four"
    streamed = client.completions.create(**body, stream=True, extra_body={"include_stop_str_in_output": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == kept.text


def test_a_truncated_prompt_keeps_its_last_tokens(client, model_dir):
    ids = PromptTokenizer(model_dir).encode("Ignore this part entirely. " + PROMPT)
    reply = client.completions.create(
        prompt=ids, max_tokens=2, echo=True, extra_body={"truncate_prompt_tokens": 5}, **GREEDY
    )
    assert reply.usage.prompt_tokens == 5 and reply.choices[0].text.startswith(
        PromptTokenizer(model_dir).decode(ids[-5:])
    )
    chat = client.chat.completions.create(
        messages=[{"role": "user", "content": "word " * 200}], max_tokens=4, extra_body={"truncate_prompt_tokens": 64},
        **GREEDY,
    )  # fmt: skip
    assert chat.usage.prompt_tokens == 64


def test_prompt_logprobs_in_vllms_shape_whole_completions_and_chat(client, model_dir):
    ids = PromptTokenizer(model_dir).encode(PROMPT)
    reply = client.completions.create(prompt=ids, max_tokens=1, extra_body={"prompt_logprobs": 2}, **GREEDY)
    scored = reply.choices[0].model_extra["prompt_logprobs"]
    assert reply.choices[0].logprobs is None, "no echo: the output's log probabilities are not the prompt's"
    assert len(scored) == len(ids) and scored[0] is None
    for token, entry in zip(ids[1:], scored[1:]):
        mine = entry[str(token)]
        assert mine["logprob"] <= 0 and mine["rank"] >= 1
        best = sorted(entry.values(), key=lambda e: e["rank"])[:2]
        assert [e["rank"] for e in best] == [1, 2] and best[0]["logprob"] >= mine["logprob"]
        assert len(entry) in (2, 3), "the token itself and the 2 most likely"
    echoed = client.completions.create(prompt=ids, max_tokens=1, echo=True, logprobs=2, **GREEDY).choices[0]
    assert echoed.logprobs.token_logprobs[1 : len(ids)] == pytest.approx(
        [entry[str(t)]["logprob"] for t, entry in zip(ids[1:], scored[1:])], abs=1e-3
    ), "the same figures as an echo's"
    chat = client.chat.completions.create(
        messages=[{"role": "user", "content": "Hi"}], max_tokens=1, extra_body={"prompt_logprobs": 0}, **GREEDY
    )
    entries = chat.model_extra["prompt_logprobs"]
    assert len(entries) == chat.usage.prompt_tokens and entries[0] is None
    assert all(len(e) == 1 and next(iter(e.values()))["rank"] >= 1 for e in entries[1:])


def test_chat_echo_puts_the_continued_assistant_message_before_the_output(client):
    prefilled = "The capital of France is"
    messages = [{"role": "user", "content": "Name a capital."}, {"role": "assistant", "content": prefilled}]
    options = {"add_generation_prompt": False, "continue_final_message": True}
    body = {"messages": messages, "max_tokens": 4, **GREEDY}
    plain = client.chat.completions.create(**body, extra_body=options).choices[0].message.content
    echoed = client.chat.completions.create(**body, extra_body={**options, "echo": True}).choices[0].message.content
    assert echoed == prefilled + plain
    chunks = client.chat.completions.create(**body, stream=True, extra_body={**options, "echo": True})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == echoed
    asked = client.chat.completions.create(messages=messages[:1], max_tokens=3, extra_body={"echo": True}, **GREEDY)
    assert not asked.choices[0].message.content.startswith("Name a"), "only an assistant message is echoed, as vLLM"


def test_logprobs_name_tokens_by_id_when_asked(client, model_dir):
    reply = client.chat.completions.create(
        messages=[{"role": "user", "content": "Say hi"}], max_tokens=3, logprobs=True, top_logprobs=2,
        extra_body={"return_tokens_as_token_ids": True}, **GREEDY,
    )  # fmt: skip
    content = reply.choices[0].logprobs.content
    ids = [int(t.token.removeprefix("token_id:")) for t in content]
    assert PromptTokenizer(model_dir).decode(ids) == reply.choices[0].message.content
    assert all(alt.token.startswith("token_id:") for t in content for alt in t.top_logprobs)


def test_continuous_usage_stats_count_in_every_chunk(client):
    chunks = list(
        client.completions.create(
            prompt=PROMPT, max_tokens=6, stream=True,
            extra_body={"stream_options": {"include_usage": True, "continuous_usage_stats": True}}, **GREEDY,
        )
    )  # fmt: skip
    counts = [c.usage.completion_tokens for c in chunks]
    assert all(c.usage is not None and c.usage.prompt_tokens == 5 for c in chunks)
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 6
    assert chunks[-1].usage.total_tokens == 11


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"allowed_token_ids": [10**9]}, "allowed_token_ids"),
        ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"allowed_token_ids": [5, 6], "response_format": {"type": "json_object"}}, "allowed_token_ids"),
        ({"bad_words": ["{"], "structured_outputs": {"regex": "[a-z]+"}}, "bad_words"),
    ],
)
def test_bad_values_are_400_naming_the_parameter(http, extra, param):
    assert_openai_error(post(http, {"model": MODEL, "prompt": PROMPT, **extra}, "/v1/completions"), 400, param)


def test_version(http):
    assert http.get("/version").json()["version"]


def test_openais_chat_parameters_that_leave_the_output_as_it_is_are_accepted(client, http):
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, store=False, metadata={"team": "a"},
        service_tier="auto", modalities=["text"], safety_identifier="user-1", prompt_cache_key="conversation-7",
    )  # fmt: skip
    assert reply.choices[0].message.content
    stored = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "store": True}
    assert_openai_error(post(http, stored), 400, "store")


def test_an_alias_names_the_model_as_vllms_served_model_name(strict_gateway, auth_headers):
    client = openai.OpenAI(base_url=f"{strict_gateway}/v1", api_key=auth_headers["Authorization"].split()[-1])
    reply = client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert reply.model == MODEL and reply.choices[0].message.content
    cards = {card.id: card for card in client.models.list().data}
    assert cards[ALIAS].model_extra["root"] == MODEL and client.models.retrieve(ALIAS).id == ALIAS
    counted = httpx.post(
        f"{strict_gateway}/tokenize", json={"model": ALIAS, "prompt": PROMPT}, headers=auth_headers, timeout=10
    )
    assert counted.json()["count"] == 5


def test_a_cache_salt_shares_a_prompts_kv_only_with_requests_that_give_the_same_salt(client):
    messages = [{"role": "user", "content": "Salted: list four colours of the rainbow and one fruit of each colour."}]

    def reused(**extra) -> tuple[int, int]:
        reply = client.chat.completions.create(messages=messages, max_tokens=1, extra_body=extra, **GREEDY)
        return reply.usage.prompt_tokens_details.cached_tokens or 0, reply.usage.prompt_tokens

    assert reused(cache_salt="tenant-a")[0] == 0
    assert reused(cache_salt="tenant-b")[0] == 0, "another salt's KV is not shared"
    cached, prompt = reused()
    assert cached < prompt - 1, "nor is it without one (the system prompt others sent may be)"
    assert reused(cache_salt="tenant-a") == (prompt - 1, prompt), "the same salt's is"
    with pytest.raises(openai.BadRequestError):
        reused(cache_salt="")


def test_return_token_ids_gives_the_prompts_and_the_outputs_ids_whole_and_streamed(client, model_dir):
    tokenizer = PromptTokenizer(model_dir)
    asked = {"messages": [{"role": "user", "content": "Count from one to ten."}], "max_tokens": 12, **GREEDY}
    whole = client.chat.completions.create(**asked, extra_body={"return_token_ids": True})
    prompt, output = whole.model_extra["prompt_token_ids"], whole.choices[0].model_extra["token_ids"]
    assert (len(prompt), len(output)) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    assert tokenizer.decode(output) == whole.choices[0].message.content, "12 tokens, no end of sequence"
    chunks = list(client.chat.completions.create(**asked, stream=True, extra_body={"return_token_ids": True}))
    assert chunks[0].model_extra["prompt_token_ids"] == prompt
    assert [i for c in chunks if c.choices for i in c.choices[0].model_extra["token_ids"]] == output
    assert "token_ids" not in client.chat.completions.create(**asked).choices[0].model_extra

    prompts = [PROMPT, "Once upon a time"]
    text = client.completions.create(prompt=prompts, max_tokens=4, extra_body={"return_token_ids": True}, **GREEDY)
    assert [c.model_extra["prompt_token_ids"] for c in text.choices] == [tokenizer.encode(p) for p in prompts]
    assert [tokenizer.decode(c.model_extra["token_ids"]) for c in text.choices] == [c.text for c in text.choices]
