"""Speculative decoding by prompt lookup (worker.ngram_drafts): a greedy sequence's guessed tokens are checked in
the step that decodes it, and its output is the one decoding token by token gives, in fewer steps."""

from __future__ import annotations

import json

import httpx
import openai

from gateway.structured_output import json_grammar
from shared.protocol import SamplingParams
from shared.settings import Speculation
from tests.conftest import MODEL
from tests.test_scheduler import request
from worker import ngram_drafts
from worker.llama_runner import LlamaRunner
from worker.scheduler import Scheduler

ON = Speculation(num_speculative_tokens=4)


def test_the_tokens_after_the_latest_earlier_occurrence_of_the_ending_ngram_are_guessed():
    text = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 6, 1, 2, 3]
    assert ngram_drafts.draft(text, ON, 4) == [7, 8, 5, 6]  # "1 2 3" came last before "7 8 5 6"
    assert ngram_drafts.draft(text, ON, 2) == [7, 8]
    assert ngram_drafts.draft([4, 5, 6, 7], ON, 4) == []
    assert ngram_drafts.draft(text, Speculation(), 4) == [], "off by default"


def test_guesses_are_accepted_up_to_the_first_the_model_does_not_choose():
    assert ngram_drafts.accepted([7, 8, 5], [7, 8, 4, 1]) == [7, 8, 4]
    assert ngram_drafts.accepted([7, 8, 5], [7, 8, 5, 1]) == [7, 8, 5, 1]
    assert ngram_drafts.accepted([7], [3, 7]) == [3]


def test_sequences_guess_unless_a_seed_holds_them_to_one_token_a_step():
    assert ngram_drafts.speculates(SamplingParams(max_tokens=8, temperature=0))
    assert ngram_drafts.speculates(SamplingParams(max_tokens=8, temperature=0, seed=3))
    assert ngram_drafts.speculates(SamplingParams(max_tokens=8, temperature=0.7))
    assert not ngram_drafts.speculates(SamplingParams(max_tokens=8, temperature=0.7, seed=3))


def run(loaded_model, speculation: Speculation, prompts: list[list[int]], max_tokens: int = 40, **sampling):
    runner = LlamaRunner(loaded_model.model, slots=4, capacity=512)
    scheduler = Scheduler(
        runner, loaded_model.tokenizer, loaded_model.eos_token_ids, 512, "m", "w", speculation=speculation
    )
    for i, prompt in enumerate(prompts):
        asked = request(f"r{i}", max_tokens, prompt=prompt)
        asked.sampling = asked.sampling.model_copy(update=sampling)
        scheduler.add(asked)
    finals, ended, streamed = {}, {}, {}
    while scheduler.has_work:
        for event in scheduler.step():
            streamed[event.request_id] = streamed.get(event.request_id, "") + event.delta
            if event.final:
                finals[event.request_id] = event.final
                ended[event.request_id] = scheduler.steps
    return finals, ended, streamed, scheduler


def test_a_greedy_output_is_the_same_with_guesses_checked_in_fewer_steps(loaded_model):
    tok = loaded_model.tokenizer
    quote = "The quick brown fox jumps over the lazy dog near the old river bank at dawn."
    messages = [{"role": "user", "content": f"Repeat this sentence three times: {quote}"}]
    copying = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))["input_ids"]
    other = tok("Write a short story about a robot who learns", add_special_tokens=False)["input_ids"]
    plain, plain_ended, _, _ = run(loaded_model, Speculation(), [copying, other])
    guessed, ended, streamed, scheduler = run(loaded_model, ON, [copying, other])
    assert {r: f.text for r, f in guessed.items()} == {r: f.text for r, f in plain.items()}
    assert streamed["r0"] == guessed["r0"].text and guessed["r0"].completion_tokens == 40
    accepted = scheduler.metrics.accepted_tokens._value.get()
    # The copying request ends sooner; the story beside it may guess nothing (as on AMX's kernels).
    assert accepted > 10 and ended["r0"] < plain_ended["r0"], (accepted, ended, plain_ended)


def copying_prompt(tok) -> list[int]:
    invoice = "Invoice 4471 from Acme Tools Ltd, 12 Harbour Road, Leeds: 40 steel brackets at 2.50 each, total 100."
    messages = [{"role": "user", "content": f"{invoice}\nList the seller, the address, the items and the total."}]
    return tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))["input_ids"]


def test_guessing_rows_take_penalties_and_give_log_probabilities_as_decoding_does(loaded_model):
    sampling = {"frequency_penalty": 0.5, "repetition_penalty": 1.1, "min_tokens": 30, "logprobs": 2}
    prompt = copying_prompt(loaded_model.tokenizer)
    plain, plain_ended, _, _ = run(loaded_model, Speculation(), [prompt], **sampling)
    guessed, ended, _, _ = run(loaded_model, ON, [prompt], **sampling)
    assert guessed["r0"].text == plain["r0"].text and ended["r0"] < plain_ended["r0"]
    assert [(p.token_id, round(p.logprob, 3)) for p in guessed["r0"].logprobs] == [
        (p.token_id, round(p.logprob, 3)) for p in plain["r0"].logprobs
    ]


def test_a_structured_output_that_copies_its_prompt_guesses_what_its_grammar_allows(loaded_model):
    """Guess rows masked as the grammar stands after the guesses before them: the same JSON, in fewer steps."""
    schema = {
        "type": "object",
        "properties": {"seller": {"type": "string"}, "address": {"type": "string"}, "total": {"type": "integer"}},
        "required": ["seller", "address", "total"],
        "additionalProperties": False,
    }
    grammar = json_grammar(schema)
    prompt = copying_prompt(loaded_model.tokenizer)
    plain, plain_ended, _, _ = run(loaded_model, Speculation(), [prompt], max_tokens=60, grammar=grammar)
    guessed, ended, streamed, scheduler = run(loaded_model, ON, [prompt], max_tokens=60, grammar=grammar)
    assert guessed["r0"].text == plain["r0"].text and streamed["r0"] == guessed["r0"].text
    assert json.loads(guessed["r0"].text)["seller"] and guessed["r0"].finish_reason == "stop"
    assert scheduler.metrics.accepted_tokens._value.get() > 5 and ended["r0"] < plain_ended["r0"]


def test_a_sampled_sequence_guesses_too(loaded_model):
    """Its tokens are its rows' own draws (speculative sampling with guesses of probability 1, which keeps the
    distribution): here only that it guesses, and that its stream is its text."""
    sampled, ended, streamed, _ = run(loaded_model, ON, [copying_prompt(loaded_model.tokenizer)], temperature=0.1)
    assert sampled["r0"].completion_tokens == 40 and ended["r0"] < 40 and streamed["r0"] == sampled["r0"].text


def test_a_sequence_waits_longer_after_each_miss_and_guesses_more_as_guesses_hold():
    pace = ngram_drafts.Pace()
    assert pace.guesses(0) > 16
    pace.took(4, 0, step=10)
    assert (pace.guesses(10), pace.guesses(11)) == (0, 1)
    pace.took(1, 0, step=11)
    assert (pace.guesses(12), pace.guesses(13)) == (0, 1), "two steps after the second miss"
    pace.took(1, 1, step=13)
    assert pace.guesses(14) > 16
    pace.took(8, 3, step=14)
    assert pace.guesses(15) == 4


def test_a_worker_that_guesses_streams_what_one_that_does_not_streams(fleet, model_dir, client):
    """A worker of the default model (named "guessing" so that only it serves it) with speculation on, through the
    gateway and the openai client, against the shared worker without it."""
    models = json.dumps({"guessing": {"path": str(model_dir)}})
    worker = fleet.worker("guessing", LLMFLEET_MODELS=models, LLMFLEET_BATCH__SPECULATION__NUM_SPECULATIVE_TOKENS="4")
    gateway = fleet.gateway(LLMFLEET_MODELS=models, LLMFLEET_PROTECTION__AUTH="open")
    try:
        guessing = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
        invoice = "Invoice 4471 from Acme Tools Ltd, 12 Harbour Road, Leeds: 40 steel brackets at 2.50 each, total 100."
        question = [{"role": "user", "content": f"{invoice}\nList the seller, the address, the items and the total."}]

        def streamed(on: openai.OpenAI, model: str) -> str:
            chunks = on.chat.completions.create(
                model=model, messages=question, max_tokens=48, temperature=0, stream=True,
                stream_options={"include_usage": True},
            )  # fmt: skip
            # The text, then the usage chunk's count of output tokens.
            return "".join(c.choices[0].delta.content or "" if c.choices else f"|{c.usage.completion_tokens}"
                           for c in chunks)  # fmt: skip

        assert streamed(guessing, "guessing") == streamed(client, MODEL)
        metrics = httpx.get(f"{worker.url}/metrics", timeout=10).text
        accepted = [line for line in metrics.splitlines() if line.startswith("llmfleet:spec_decode_num_accepted")]
        assert accepted and float(accepted[0].split()[-1]) > 0
    finally:
        worker.stop()
        gateway.stop()


def test_an_adapters_sequence_guesses_through_its_adapter(loaded_model, tmp_path):
    """Guess rows of a LoRA adapter's sequence take its updates too: the same output as without guessing."""
    from tests.test_lora import write_adapter
    from worker import lora

    write_adapter(loaded_model.model, tmp_path, rank=2, alpha=1.0, merge=False)
    adapter = lora.load("tuned", tmp_path, loaded_model.model)
    prompt = copying_prompt(loaded_model.tokenizer)

    def tuned(speculation: Speculation):
        runner = LlamaRunner(loaded_model.model, slots=2, capacity=512)
        scheduler = Scheduler(
            runner, loaded_model.tokenizer, loaded_model.eos_token_ids, 512, "m", "w",
            adapters=lora.Adapters("m", configured={"tuned": adapter}), speculation=speculation,
        )  # fmt: skip
        asked = request("r", 40, prompt=prompt)
        asked.adapter = "tuned"
        scheduler.add(asked)
        steps, final = 0, None
        while scheduler.has_work:
            steps += 1
            final = next((e.final for e in scheduler.step() if e.final), final)
        return final.text, steps

    (plain, plain_steps), (guessed, steps) = tuned(Speculation()), tuned(ON)
    assert guessed == plain and steps < plain_steps
