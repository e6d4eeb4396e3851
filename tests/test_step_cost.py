from worker.step_cost import MIN_PREFILL_TOKENS, StepCost


def test_the_budget_is_the_prompt_tokens_that_fit_in_the_step_time():
    assert StepCost(overhead_s=0.05, per_token_s=0.005).prefill_budget(0.25, ceiling=512) == 40


def test_the_budget_never_exceeds_the_ceiling_nor_falls_below_the_floor():
    fast = StepCost(overhead_s=0.01, per_token_s=1e-6)  # a GPU: tokens are nearly free
    slow = StepCost(overhead_s=0.3, per_token_s=0.01)  # the overhead alone exceeds the step time
    assert fast.prefill_budget(0.25, ceiling=512) == 512
    assert slow.prefill_budget(0.25, ceiling=512) == MIN_PREFILL_TOKENS
    assert slow.prefill_budget(0.25, ceiling=8) == 8
