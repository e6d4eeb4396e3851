"""What a step costs on this machine, measured at start-up; the prompt-token budget of a step follows from it.

On a CPU a prefill is compute-bound: a step's time grows about linearly with its tokens (overhead + per-token
cost), so prefilling several prompts in one step saves nothing and makes each of them wait for all the others.
The budget is the tokens that fit in `batch.prefill_step_ms`: short prompts that arrive together are prefilled
one after another (the first answers at once instead of all at the end), a long prompt is split into chunks
between decode steps, and running streams never stall longer than about one such step. On a GPU, where a step's
time hardly grows with its tokens, the budget is simply `batch.max_prefill_tokens`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from worker.llama_runner import LlamaRunner, PrefillChunk

MIN_PREFILL_TOKENS = 32


@dataclass(frozen=True)
class StepCost:
    overhead_s: float
    per_token_s: float

    def prefill_budget(self, step_s: float, ceiling: int) -> int:
        """Prompt tokens a step may prefill so that it takes about `step_s` (within [MIN_PREFILL_TOKENS, ceiling])."""
        fits = (step_s - self.overhead_s) / self.per_token_s
        return max(min(MIN_PREFILL_TOKENS, ceiling), min(int(fits), ceiling))


def best_seconds(call: Callable[[], object], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def measure(runner: LlamaRunner, small: int = 16, large: int = 128, repeats: int = 2) -> StepCost:
    """Warm the kernels up (the first calls compile or pack them), then time prefill steps of two sizes."""
    runner.step([], [], [], [PrefillChunk(0, [1, 2, 3], 0)])
    runner.step([0], [4], [3], [])

    def seconds(tokens: int) -> float:
        return best_seconds(lambda: runner.step([], [], [], [PrefillChunk(0, list(range(1, tokens + 1)), 0)]), repeats)

    short, long = seconds(small), seconds(large)
    per_token = max((long - short) / (large - small), 1e-7)
    return StepCost(overhead_s=max(short - per_token * small, 0.0), per_token_s=per_token)
