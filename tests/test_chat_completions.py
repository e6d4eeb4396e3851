"""Chat completions through the real gateway, Redis and worker, with the official openai client."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from gateway.serving import _another_choice
from shared.protocol import InferenceRequest, SamplingParams
from tests.conftest import FRANCE_QUESTION, MODEL

FRANCE = [{"role": "user", "content": FRANCE_QUESTION}]


def test_answers_the_capital_of_france(client):
    reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=30)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model == MODEL


def test_streams_tokens_as_they_are_generated_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=30, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3, "tokens must arrive in several chunks, not at once"
    assert "Paris" in "".join(pieces)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    usage = [c.usage for c in chunks if c.usage]
    assert len(usage) == 1 and usage[0].completion_tokens > 0
    whole = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=30)
    assert "".join(pieces) == whole.choices[0].message.content


def test_sse_wire_format_ends_with_done(http):
    body = {"model": MODEL, "messages": FRANCE, "max_tokens": 5, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        data = [line for line in reply.iter_lines() if line.startswith("data:")]
    assert data[-1] == "data: [DONE]"


def test_max_tokens_ends_with_length(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a long story about a dragon."}], max_tokens=5
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5


def test_greedy_is_deterministic(client):
    messages = [{"role": "user", "content": "Name three colours."}]
    texts = {
        client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)
        .choices[0]
        .message.content
        for _ in range(2)
    }
    assert len(texts) == 1


def test_seed_makes_sampling_reproducible(client):
    messages = [{"role": "user", "content": "Invent a name for a cat."}]

    def sample(seed):
        return (
            client.chat.completions.create(
                model=MODEL,
                messages=messages,
                temperature=1.0,
                top_p=0.95,
                seed=seed,
                max_tokens=16,
                extra_body={"top_k": 50, "repetition_penalty": 1.1},
            )  # fmt: skip
            .choices[0]
            .message.content
        )

    # The first call fills the prefix cache; the two compared calls then run the same arithmetic. (A cache hit
    # or another batch composition changes bf16 logits in the last bits, which can flip a sampled token: as in
    # vLLM, a seed reproduces a sample under the same conditions, not bit-exactly across all of them.)
    sample(7)
    assert sample(7) == sample(7)


def test_stop_sequence_cuts_the_text_and_is_not_returned(client):
    messages = [{"role": "user", "content": "Count from one to ten in words, separated by commas."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40)
    text = full.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.find(stop)]
    streamed = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=40, stop=stop, stream=True
    )
    pieces = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert pieces == text[: text.find(stop)]


# Words the model greedily repeats after "The word is w. …" (checked one by one), so each stream's text tells
# whose it is: a token of one request in another's stream would show up as a foreign word.
WORDS = ["apple", "river", "candle", "lemon", "violin", "pepper", "castle", "rocket",
         "garden", "silver", "island", "pencil", "thunder", "mirror", "forest", "cookie"]  # fmt: skip


def test_sixteen_concurrent_streams_complete_without_interleaving(client):
    def stream(word: str) -> tuple[str, str | None]:
        prompt = f"The word is {word}. " * 3 + "The word is"
        chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True)
        text, finish = "", None
        for chunk in chunks:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    with ThreadPoolExecutor(len(WORDS)) as pool:
        results = list(pool.map(stream, WORDS))
    for word, (text, finish) in zip(WORDS, results):
        assert finish in ("length", "stop")
        assert text.split()[0].strip(".") == word, (word, text)
        assert not [other for other in WORDS if other != word and other in text], (word, text)


def test_lists_the_served_model(client):
    assert MODEL in [m.id for m in client.models.list().data]
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.model_extra["max_model_len"] > 0, "vLLM's max_model_len"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_logprobs_give_each_token_and_the_most_likely_alternatives_whole_and_streamed(client):
    whole = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3
    )
    tokens = whole.choices[0].logprobs.content
    assert len(tokens) == whole.usage.completion_tokens
    assert "".join(t.token for t in tokens) == whole.choices[0].message.content
    for t in tokens:
        assert t.logprob <= 0 and t.bytes == list(t.token.encode())
        assert len(t.top_logprobs) == 3
        alternatives = [a.logprob for a in t.top_logprobs]
        assert alternatives == sorted(alternatives, reverse=True)
        assert t.top_logprobs[0].token == t.token, "greedy: the chosen token is the most likely"
        assert t.logprob == pytest.approx(alternatives[0])
    stream = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3, stream=True
    )
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in tokens]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in tokens], abs=1e-3)
    plain = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=12)
    assert plain.choices[0].logprobs is None


def test_a_frequency_penalty_makes_greedy_output_repeat_itself_less(client):
    messages = [{"role": "user", "content": "Repeat the word 'cat' thirty times."}]

    def most_repeated(**penalty) -> int:
        reply = client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=40, logprobs=True, **penalty
        )
        tokens = [t.token for t in reply.choices[0].logprobs.content]
        return max(tokens.count(t) for t in tokens)

    assert most_repeated(frequency_penalty=1.5) < most_repeated()


def test_n_choices_each_sampled_with_its_own_seed_whole_and_streamed(client):
    # Outputs are not compared across requests: a choice's bits may depend on what shared its steps (on AMX, and
    # AVX512-BF16, unless batch.batch_invariant), and a sampled draw near a boundary then goes another way.
    story = [{"role": "user", "content": "Tell me a story."}]
    options = {"model": MODEL, "messages": story, "max_tokens": 6, "seed": 11, "extra_body": {"ignore_eos": True}}
    whole = client.chat.completions.create(n=3, **options)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert len({c.message.content for c in whole.choices}) > 1, "each choice draws with its own seed"
    assert whole.usage.completion_tokens == 18
    one = client.chat.completions.create(n=1, **options)
    assert whole.usage.prompt_tokens == one.usage.prompt_tokens, "the prompt is counted once"

    stream = client.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **options)
    pieces: dict[int, str] = {0: "", 1: "", 2: ""}
    finishes, usage = [], None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            pieces[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes.append(choice.index)
    assert all(pieces.values()) and len(set(pieces.values())) > 1
    assert sorted(finishes) == [0, 1, 2] and usage.completion_tokens == 18


def test_choice_zero_is_the_request_as_sent_and_each_later_one_draws_with_the_next_seed():
    sampling = SamplingParams(max_tokens=4, seed=11, prompt_logprobs=1)
    request = InferenceRequest(id="r", model=MODEL, prompt_token_ids=[1, 2], sampling=sampling, deadline=0)
    later = _another_choice(request, 2)
    assert later.id != request.id and later.choice_of == request.id
    assert later.sampling.seed == 13 and later.sampling.prompt_logprobs is None, "the first choice scores the prompt"
