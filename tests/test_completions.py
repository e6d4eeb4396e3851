"""Plain-prompt completions (/v1/completions) through the whole path."""

from __future__ import annotations

from gateway.prompts import PromptTokenizer
from tests.conftest import MODEL


def test_completion_continues_the_prompt(client):
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    choice = reply.choices[0]
    assert "Paris" in choice.text
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == 5


def test_completion_streams(client):
    chunks = list(
        client.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=10, temperature=0, stream=True)
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    whole = client.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=10, temperature=0)
    assert text == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completion_stop_string(client):
    reply = client.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=20, temperature=0, stop=[","])
    assert "," not in reply.choices[0].text
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].stop_reason == ",", "vLLM's stop_reason: the stop string that matched"
    streamed = client.completions.create(
        model=MODEL, prompt="One, two, three,", max_tokens=20, temperature=0, stop=[","], stream=True
    )
    (last,) = [c.choices[0] for c in streamed if c.choices and c.choices[0].finish_reason]
    assert last.stop_reason == ","


def test_completion_accepts_token_ids(client):
    reply = client.completions.create(model=MODEL, prompt=[504, 3575, 282, 4649, 314], max_tokens=4, temperature=0)
    assert reply.usage.prompt_tokens == 5


def test_completion_logprobs_in_the_legacy_shape(client):
    reply = client.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=6, temperature=0, logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert len(logprobs.token_logprobs) == len(logprobs.tokens) == reply.usage.completion_tokens
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    for token, top in zip(logprobs.tokens, logprobs.top_logprobs):
        assert len(top) == 2 and max(top, key=top.get) == token
    chunks = client.completions.create(
        model=MODEL, prompt="One, two, three,", max_tokens=6, temperature=0, logprobs=2, stream=True
    )
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == logprobs.text_offset, "offsets count on across the stream's chunks"


def test_logit_bias_bans_or_forces_tokens(client, model_dir):
    tokenizer = PromptTokenizer(model_dir)
    prompt = "The capital of France is"
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0).choices[0].text
    (banned,) = tokenizer.encode(first)
    other = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logit_bias={banned: -100}
    )
    assert other.choices[0].text != first
    (forced,) = tokenizer.encode(" banana")
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logit_bias={forced: 100})
    assert reply.choices[0].text == " banana"


def test_a_stop_token_id_ends_the_output_before_it(client, model_dir):
    (comma,) = PromptTokenizer(model_dir).encode(",")
    reply = client.completions.create(
        model=MODEL, prompt="One, two, three,", max_tokens=20, temperature=0, extra_body={"stop_token_ids": [comma]}
    )
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].stop_reason == comma
    assert reply.choices[0].text.strip() and "," not in reply.choices[0].text


def test_min_tokens_holds_off_the_end_of_sequence_and_stop_strings(client):
    # Prompts no other test sends: a prompt the prefix cache holds may answer otherwise (batch.batch_invariant).
    japan = [{"role": "user", "content": "In one word: the capital of Japan?"}]
    reply = client.chat.completions.create(
        model=MODEL, messages=japan, max_tokens=40, temperature=0, extra_body={"min_tokens": 24}
    )
    assert reply.usage.completion_tokens >= 24
    stopped = client.completions.create(
        model=MODEL, prompt="Monday, Tuesday,", max_tokens=20, temperature=0, stop=[","], extra_body={"min_tokens": 4}
    )
    assert stopped.choices[0].text.count(",") >= 1 and stopped.usage.completion_tokens >= 4, stopped.choices[0].text


def test_special_tokens_the_model_writes_stay_in_the_text_only_when_asked(client):
    forced = {"logit_bias": {1: 100}, "max_tokens": 2, "temperature": 0}  # 1: <|im_start|>
    skipped = client.completions.create(model=MODEL, prompt="Special tokens:", **forced)
    kept = client.completions.create(
        model=MODEL, prompt="Special tokens:", **forced, extra_body={"skip_special_tokens": False}
    )
    assert skipped.choices[0].text == ""
    assert kept.choices[0].text == "<|im_start|><|im_start|>"


def test_min_p_one_leaves_only_the_most_likely_token_whatever_the_seed(client):
    prompt = "A list of fruits that grow on trees:"
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)  # later requests reuse its cached prompt
    texts = {
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=8, temperature=1.5, seed=seed, extra_body={"min_p": 1.0}
        )
        .choices[0]
        .text
        for seed in (1, 2, 3)
    }
    assert len(texts) == 1


def test_several_prompts_answer_in_one_response_numbered_prompt_by_prompt(client, http):
    prompts = ["The capital of France is", "One, two, three,", "Roses are red,"]
    counts = [http.post("/tokenize", json={"model": MODEL, "prompt": p}).json()["count"] for p in prompts]
    options = {
        "model": MODEL,
        "max_tokens": 4,
        "n": 2,
        "temperature": 0,
        "echo": True,
        "extra_body": {"ignore_eos": True},
    }
    whole = client.completions.create(prompt=prompts, **options)
    assert [c.index for c in whole.choices] == list(range(6))
    for choice in whole.choices:
        assert choice.text.startswith(prompts[choice.index // 2]), "choice i answers prompt i // n"
    assert "Paris" in whole.choices[0].text
    assert whole.usage.prompt_tokens == sum(counts), "each prompt counted once, whatever n"
    assert whole.usage.completion_tokens == 24

    stream = client.completions.create(prompt=prompts, stream=True, stream_options={"include_usage": True}, **options)
    pieces, usage = [""] * 6, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            pieces[choice.index] += choice.text
    assert all(piece.startswith(prompts[i // 2]) for i, piece in enumerate(pieces))
    assert usage.prompt_tokens == sum(counts) and usage.completion_tokens == 24


def test_a_batch_of_token_id_prompts_is_scored_prompt_by_prompt(client, model_dir):
    tokenizer = PromptTokenizer(model_dir)
    batch = [tokenizer.encode("The sky is blue"), tokenizer.encode("Grass is green")]
    scored = client.completions.create(model=MODEL, prompt=batch, max_tokens=1, echo=True, logprobs=1, temperature=0)
    assert len(scored.choices) == 2
    for choice, ids in zip(scored.choices, batch):
        assert len(choice.logprobs.token_logprobs) == len(ids) + 1 and choice.logprobs.token_logprobs[0] is None
