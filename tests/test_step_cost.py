from worker.step_cost import MIN_PREFILL_TOKENS, PrefillBudget, StepCost


def test_the_budget_is_the_prompt_tokens_that_fit_in_the_step_time():
    assert StepCost(overhead_s=0.05, per_token_s=0.005).prefill_budget(0.25, ceiling=512) == 40


def test_the_budget_never_exceeds_the_ceiling_nor_falls_below_the_floor():
    fast = StepCost(overhead_s=0.01, per_token_s=1e-6)  # a GPU: tokens are nearly free
    slow = StepCost(overhead_s=0.3, per_token_s=0.01)  # the overhead alone exceeds the step time
    assert fast.prefill_budget(0.25, ceiling=512) == 512
    assert slow.prefill_budget(0.25, ceiling=512) == MIN_PREFILL_TOKENS
    assert slow.prefill_budget(0.25, ceiling=8) == 8


def test_the_budget_moves_towards_what_fits_in_the_step_time_in_steps_that_spend_it():
    budget = PrefillBudget(300, step_s=0.1, ceiling=512)
    budget.observe(120, 0.3)  # a step that did not spend it all says nothing about its size
    assert budget.tokens == 300
    for _ in range(40):  # served steps cost 20 ms + 0.5 ms a prompt token: 160 tokens fit in 100 ms
        budget.observe(budget.tokens, 0.02 + 0.0005 * budget.tokens)
    assert 150 <= budget.tokens <= 160
    budget.observe(budget.tokens, 1.0)  # one step slowed by another process moves it, but not all the way
    assert budget.tokens > 80


def test_a_kept_budget_stays_within_its_floor_and_ceiling_and_a_fixed_one_never_moves():
    budget = PrefillBudget(300, step_s=0.1, ceiling=512)
    for _ in range(100):
        budget.observe(budget.tokens, 10.0)
    assert budget.tokens == MIN_PREFILL_TOKENS
    for _ in range(100):
        budget.observe(budget.tokens, 0.001)
    assert budget.tokens == 512
    fixed = PrefillBudget(16)
    fixed.observe(16, 10.0)
    assert fixed.tokens == 16


def test_waiting_prompts_share_a_step_only_as_far_as_the_steps_fixed_cost_outweighs_their_own():
    budget = PrefillBudget(400, step_s=0.15, ceiling=512, fixed_tokens=16)
    assert budget.prompts_per_step([100] * 4, decoding=2) == 1  # a conversation's next turns: one a step
    assert budget.prompts_per_step([40] * 32, decoding=0) == 4  # a burst of chat prompts: several
    assert budget.prompts_per_step([40] * 32, decoding=32) == 6  # more so beside many decoding rows
    assert budget.prompts_per_step([1500] * 8, decoding=8) == 1  # long prompts: a budget's chunk is their size
    assert PrefillBudget(16).prompts_per_step([6] * 3, decoding=0) == 3  # no step cost known: as many as fit
