"""Continuous batching on the real model: join at the next step, leave at once, never start what ended."""

from __future__ import annotations

import time

import pytest

from shared.metrics import WORKER
from shared.protocol import InferenceRequest, SamplingParams
from worker.llama_runner import LlamaRunner
from worker.scheduler import BATCH_DEFERRED_STEPS, PASSED_OVER_MAX, Scheduler
from worker.step_cost import PrefillBudget

PROMPT = [1, 504, 3575, 282, 4649, 314]


def scheduler_with(loaded_model, budget: PrefillBudget | int) -> Scheduler:
    runner = LlamaRunner(loaded_model.model, slots=4, capacity=512)
    return Scheduler(runner, loaded_model.tokenizer, loaded_model.eos_token_ids, budget, "m", "w")


@pytest.fixture
def scheduler(loaded_model):
    return scheduler_with(loaded_model, 16)


def request(
    rid: str, max_tokens: int, prompt=PROMPT, deadline_in: float = 60, batch: bool = False, priority: int = 0
) -> InferenceRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return InferenceRequest(
        id=rid,
        model="m",
        prompt_token_ids=list(prompt),
        sampling=sampling,
        deadline=time.time() + deadline_in,
        batch=batch,
        priority=priority,
    )


def ids(events):
    return {e.request_id for e in events}


def test_a_request_joins_the_running_batch_and_leaves_when_done(scheduler):
    scheduler.add(request("a", 12))
    for _ in range(3):
        assert ids(scheduler.step()) == {"a"}
    scheduler.add(request("b", 3))
    assert ids(scheduler.step()) == {"a", "b"}, "b is prefilled in the same step that decodes a"
    finals = {}
    while scheduler.has_work:
        for event in scheduler.step():
            if event.final:
                finals[event.request_id] = event.final
    assert finals["b"].completion_tokens == 3
    assert finals["a"].completion_tokens == 12
    assert finals["b"].finished < finals["a"].finished, "b leaves without waiting for a"


def test_a_long_prompt_is_prefilled_in_chunks_while_others_keep_decoding(scheduler):
    scheduler.add(request("a", 30))
    scheduler.step()
    scheduler.add(request("long", 2, prompt=PROMPT * 16))  # 96 tokens, budget 16 per step
    steps_with_a = 0
    while "long" in scheduler.running or any(r.id == "long" for r in scheduler.waiting):
        events = scheduler.step()
        steps_with_a += "a" in ids(events)
    assert steps_with_a >= 6, "a got a token in every step of the long prefill"


def test_steps_that_spend_the_prefill_budget_keep_it_to_what_fits_in_the_step_time(loaded_model):
    budget = PrefillBudget(64, step_s=1e-4, ceiling=64)  # no step is this fast: each full one shrinks the budget
    scheduler = scheduler_with(loaded_model, budget)
    scheduler.add(request("long", 2, prompt=PROMPT * 40))
    while scheduler.has_work:
        scheduler.step()
    assert budget.tokens < 64
    assert WORKER.get_sample_value("llmfleet:prefill_budget_tokens", {"model_name": "m"}) == budget.tokens


@pytest.mark.parametrize(("fixed_tokens", "first_tokens"), [(1, ["a", "ab", "abc"]), (100, ["abc", "abc", "abc"])])
def test_prompts_that_arrive_together_answer_one_step_after_another_unless_steps_cost_more(
    loaded_model, fixed_tokens, first_tokens
):
    budget = PrefillBudget(64, fixed_tokens=fixed_tokens)  # a step's own cost, in prompt tokens
    scheduler = scheduler_with(loaded_model, budget)
    for rid in "abc":
        scheduler.add(request(rid, 4, prompt=PROMPT * 2))  # 12 tokens each
    assert [ids(scheduler.step()) for _ in range(3)] == [set(names) for names in first_tokens]


def test_a_short_prompt_is_prefilled_before_the_rest_of_a_long_one(scheduler):
    scheduler.add(request("long", 2, prompt=PROMPT * 16))  # 96 tokens, budget 16 per step
    scheduler.step()
    scheduler.add(request("short", 2))
    assert "short" in ids(scheduler.step()), "its 6 tokens go first, its first token comes in the next step"
    assert scheduler.running["long"].prefilled == 16 + 10


def test_an_interactive_prompt_is_prefilled_before_a_batch_line_that_came_first(scheduler):
    scheduler.add(request("line", 2, prompt=PROMPT * 2, batch=True))  # 12 tokens each, budget 16 per step
    scheduler.add(request("chat", 2, prompt=PROMPT * 2))
    assert ids(scheduler.step()) == {"chat"}
    assert ids(scheduler.step()) == {"chat", "line"}


def test_waiting_requests_start_most_urgent_priority_first_then_in_arrival_order(scheduler):
    for rid, priority in [("a", 0), ("low", 5), ("urgent", -5), ("b", 0), ("lower", 9), ("urgent-too", -5)]:
        scheduler.add(request(rid, 2, priority=priority))
    assert [r.id for r in scheduler.waiting] == ["urgent", "urgent-too", "a", "b", "low", "lower"]
    scheduler.step()  # four slots
    assert set(scheduler.running) == {"urgent", "urgent-too", "a", "b"}


def test_the_more_urgent_prompt_is_prefilled_first_whatever_its_length(scheduler):
    scheduler.add(request("short", 2, priority=1))
    scheduler.add(request("long", 2, prompt=PROMPT * 2, priority=0))  # 12 tokens, the budget 16 a step
    assert ids(scheduler.step()) == {"long"}
    assert ids(scheduler.step()) == {"long", "short"}


@pytest.mark.parametrize("cache_tokens", [0, 4096], ids=["recomputed", "from-the-prefix-cache"])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded-sampling"])
def test_a_more_urgent_request_preempts_the_least_urgent_running_one_which_resumes_unchanged(
    loaded_model, cache_tokens, sampled
):
    def run(urgent: bool) -> tuple[list[str], dict[str, tuple]]:
        """(the order requests ended in, each one's streamed token ids, final text and log probabilities' ids)."""
        runner = LlamaRunner(loaded_model.model, slots=6, capacity=512)
        scheduler = Scheduler(
            runner, loaded_model.tokenizer, loaded_model.eos_token_ids, 64, "m", "w", max_running=4,
            prefix_cache_tokens=cache_tokens,
        )  # fmt: skip
        for i in range(4):  # bg1 and bg3 at priority 1, bg3 the latest started
            r = request(f"bg{i}", 24, prompt=PROMPT * (i + 1), priority=i % 2)
            if sampled:
                r.sampling = r.sampling.model_copy(update={"temperature": 0.8, "seed": 7 + i, "logprobs": 0})
            scheduler.add(r)
        streamed, order, ended = {}, [], {}
        for step in range(10_000):
            if step == 6 and urgent:
                scheduler.add(request("urgent", 3, priority=-1))
            if not scheduler.has_work:
                break
            for event in scheduler.step():
                streamed.setdefault(event.request_id, []).extend(event.token_ids)
                if event.final:
                    order.append(event.request_id)
                    ended[event.request_id] = (event.final.text, [t.token_id for t in event.final.logprobs or []])
        return order, {rid: (streamed[rid], *ended[rid]) for rid in ended}

    before = WORKER.get_sample_value("llmfleet:preemptions_total", {"model_name": "m"}) or 0
    order, preempted = run(urgent=True)
    assert order[0] == "urgent"
    assert WORKER.get_sample_value("llmfleet:preemptions_total", {"model_name": "m"}) == before + 1
    _, alone = run(urgent=False)
    if not sampled:  # (a sampled token can change with the step's other rows: the logits move in the last bits)
        others = ("bg0", "bg1", "bg2")
        assert {r: preempted[r] for r in others} == {r: alone[r] for r in others}
    # bg3 went on from where it stopped: each token streamed once, its text theirs, its log probabilities carried
    # over (its KV computed again in a prompt chunk: greedy near ties may go another way than in decode steps).
    tokens, text, logprob_ids = preempted["bg3"]
    assert len(tokens) == 24 and text == loaded_model.tokenizer.decode(tokens, skip_special_tokens=True)
    assert logprob_ids == (tokens if sampled else [])


@pytest.mark.parametrize(
    ("fixed_tokens", "batch"), [(None, False), (1, False), (1, True)], ids=["budget-only", "one-prompt-a-step", "batch"]
)
def test_a_stream_of_short_prompts_never_starves_a_long_one(loaded_model, fixed_tokens, batch):
    budget = PrefillBudget(16, fixed_tokens=fixed_tokens)
    scheduler = scheduler_with(loaded_model, budget)
    scheduler.add(request("long", 1, prompt=PROMPT * 16, batch=batch))  # 96 tokens, budget 16: 6 steps of its own
    for n in range(PASSED_OVER_MAX * 6 + 8 + (BATCH_DEFERRED_STEPS if batch else 0)):
        # Three short prompts ready at every step: together more than a step's budget.
        scheduler.add(request(f"short-{n}-0", 1))
        scheduler.add(request(f"short-{n}-1", 1))
        scheduler.add(request(f"short-{n}-2", 1))
        if "long" in ids(scheduler.step()):
            return
    pytest.fail(
        "the long prompt was passed over for longer than PASSED_OVER_MAX times its own prefill"
        + (" plus BATCH_DEFERRED_STEPS" if batch else "")
    )


def test_a_long_prompt_alone_is_prefilled_over_steps_that_sample_nothing(scheduler):
    scheduler.add(request("long", 3, prompt=PROMPT * 16))  # 96 tokens, budget 16: five steps without a token
    finals = [e.final for _ in range(12) for e in scheduler.step() if e.final]
    assert [f.completion_tokens for f in finals] == [3]


def test_a_cancelled_queued_request_never_starts(scheduler):
    scheduler.add(request("a", 5))
    scheduler.cancel("a")
    (event,) = scheduler.step()
    assert event.final.finish_reason == "cancelled"
    assert event.final.completion_tokens == 0
    assert not scheduler.has_work


def test_a_running_request_cancelled_stops_at_the_next_step_and_frees_its_slot(scheduler):
    scheduler.add(request("a", 50))
    scheduler.step()
    scheduler.step()
    scheduler.cancel("a")
    (event,) = scheduler.step()
    assert event.final.finish_reason == "cancelled"
    assert scheduler.free_capacity == 4


def test_a_request_past_its_deadline_is_expired_not_started(scheduler):
    scheduler.add(request("late", 5, deadline_in=-1))
    (event,) = scheduler.step()
    assert event.final.finish_reason == "expired"
    assert event.final.completion_tokens == 0


def run_to_end(scheduler: Scheduler, req: InferenceRequest):
    scheduler.add(req)
    while scheduler.has_work:
        for event in scheduler.step():
            if event.final:
                return scheduler, event.final
    raise AssertionError("no final")


def cached_scheduler(loaded_model, cache_tokens: int) -> Scheduler:
    runner = LlamaRunner(loaded_model.model, slots=8, capacity=512)
    return Scheduler(
        runner, loaded_model.tokenizer, loaded_model.eos_token_ids, 512, "m", "w",
        max_running=4, prefix_cache_tokens=cache_tokens,
    )  # fmt: skip


def test_the_next_turn_reuses_the_previous_turns_kv_and_greedy_output_is_unchanged(loaded_model):
    tok = loaded_model.tokenizer
    turn1 = tok("The history of the printing press begins in", add_special_tokens=False)["input_ids"] * 3
    with_cache = cached_scheduler(loaded_model, 4096)
    _, first = run_to_end(with_cache, request("t1", 12, prompt=turn1))
    turn2 = turn1 + tok(first.text + " Tell me more.", add_special_tokens=False)["input_ids"]

    run_to_end(with_cache, request("t2", 12, prompt=turn2))
    assert with_cache.reused_tokens_total >= len(turn1)
    _, cached = run_to_end(with_cache, request("t2-again", 12, prompt=turn2))
    _, uncached = run_to_end(cached_scheduler(loaded_model, 0), request("t2", 12, prompt=turn2))
    assert cached.text == uncached.text


def test_concurrent_requests_sharing_a_system_prompt_compute_it_once(loaded_model):
    system = list(range(1000, 1048))
    scheduler = cached_scheduler(loaded_model, 4096)
    scheduler.add(request("a", 8, prompt=system + [5, 6, 7]))
    scheduler.step()
    scheduler.add(request("b", 8, prompt=system + [9, 10]))
    scheduler.step()
    assert scheduler.running["b"].reused == len(system)


def test_the_later_choices_of_a_request_wait_for_the_first_ones_prefill_and_copy_it(loaded_model):
    """The choices of one request (n) share their whole prompt: computed once, not once a choice."""
    scheduler = cached_scheduler(loaded_model, 4096)
    prompt = PROMPT * 16
    scheduler.add(request("a", 4, prompt=prompt))
    for rid in ("b", "c"):
        scheduler.add(request(rid, 4, prompt=prompt).model_copy(update={"choice_of": "a"}))
    scheduler.add(request("other", 4, prompt=prompt))
    first = scheduler.step()
    assert ids(first) == {"a", "other"}, "the later choices wait; a request of its own does not"
    scheduler.step()
    assert scheduler.running["b"].reused == scheduler.running["c"].reused == len(prompt) - 1
    finals = {e.request_id: e.final for e in run_steps(scheduler) if e.final}
    assert finals["a"].text == finals["b"].text == finals["c"].text == finals["other"].text


def run_steps(scheduler):
    events = []
    while scheduler.has_work:
        events += scheduler.step()
    return events


POISON = 9999


def poisoned(scheduler: Scheduler, fails) -> Scheduler:
    """The runner's step raises whenever `fails(its arguments)` says so, like a bug that only some inputs reach."""
    step = scheduler.runner.step

    def faulty(**call):
        if fails(call):
            raise IndexError("injected")
        return step(**call)

    scheduler.runner.step = faulty
    return scheduler


def poison_in_a_prompt(call) -> bool:
    return any(POISON in chunk.tokens for chunk in call["prefills"])


def test_a_request_whose_prompt_fails_the_step_ends_with_an_error_and_the_others_go_on(scheduler):
    poisoned(scheduler, poison_in_a_prompt)
    scheduler.add(request("a", 8))
    scheduler.step()
    scheduler.add(request("bad", 8, prompt=[*PROMPT, POISON]))
    scheduler.add(request("b", 8))
    finals = {e.request_id: e.final for e in run_steps(scheduler) if e.final}
    assert finals["bad"].finish_reason == "error"
    assert "IndexError" in finals["bad"].error and "logged" in finals["bad"].error
    assert finals["a"].finish_reason == finals["b"].finish_reason == "length"
    assert finals["a"].completion_tokens == finals["b"].completion_tokens == 8
    _, after = run_to_end(scheduler, request("c", 4))
    assert after.finish_reason == "length", "the scheduler goes on serving"
    assert WORKER.get_sample_value("llmfleet:step_failures_total", {"model_name": "m"}) >= 1


def test_a_request_that_fails_while_decoding_ends_with_the_tokens_it_streamed(scheduler):
    scheduler.add(request("a", 12))
    scheduler.add(request("bad", 12))
    scheduler.step()
    bad_slot = scheduler.running["bad"].slot

    def bad_decodes_its_fifth_token(call) -> bool:
        at = zip(call["decode_slots"], call["decode_positions"])
        return any(slot == bad_slot and position >= len(PROMPT) + 3 for slot, position in at)

    poisoned(scheduler, bad_decodes_its_fifth_token)
    events = run_steps(scheduler)
    finals = {e.request_id: e.final for e in events if e.final}
    assert finals["bad"].finish_reason == "error"
    assert finals["bad"].completion_tokens == 4
    assert finals["a"].completion_tokens == 12
    assert not scheduler.running and scheduler.free_capacity == 4


def test_a_step_that_fails_for_every_request_is_the_workers_fault_and_raises(scheduler):
    poisoned(scheduler, lambda call: True)
    scheduler.add(request("a", 4))
    scheduler.add(request("b", 4))
    with pytest.raises(IndexError):
        scheduler.step()


def test_a_lone_request_that_fails_ends_but_a_second_failure_in_a_row_raises(scheduler):
    poisoned(scheduler, lambda call: True)
    _, final = run_to_end(scheduler, request("a", 4))
    assert final.finish_reason == "error"
    scheduler.add(request("b", 4))
    with pytest.raises(IndexError):
        scheduler.step()


def test_a_request_that_fails_to_start_ends_with_an_error_and_gives_its_slot_back(loaded_model):
    scheduler = cached_scheduler(loaded_model, 4096)
    run_to_end(scheduler, request("first", 2, prompt=PROMPT * 4))

    def broken(*_):
        raise RuntimeError("injected")

    scheduler.runner.copy_prefix = broken  # the next prompt shares the first one's: its KV would be copied
    scheduler.add(request("bad", 4, prompt=PROMPT * 4 + [7]))
    scheduler.add(request("good", 4, prompt=[9, 8, 7]))
    finals = {e.request_id: e.final for e in run_steps(scheduler) if e.final}
    assert finals["bad"].finish_reason == "error" and "RuntimeError" in finals["bad"].error
    assert finals["good"].finish_reason == "length"
    slots = {scheduler.slots.acquire(None) for _ in range(8)}
    assert len(slots) == 8, "no slot was lost"
