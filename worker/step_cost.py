"""The prompt-token budget of a step: what fits in `batch.prefill_step_ms`, measured at start-up and then kept by the
steps served; and how many of the waiting prompts a step takes within it.

On a CPU a prefill is compute-bound: a step's time grows about linearly with its tokens (overhead + per-token
cost). The budget is the tokens that fit in `batch.prefill_step_ms`: a long prompt is split into chunks between
decode steps, and running streams never stall longer than about one such step. On a GPU, where a step's time hardly
grows with its tokens, the budget is simply `batch.max_prefill_tokens`.

The start-up timing prefills from position 0 with nothing else in the step, on a machine still busy starting the
other processes; served steps also decode the running streams and attend to the keys before the chunk. So the
budget follows the steps that spend all of it (PrefillBudget.observe).

A prompt answers at the end of the step that finishes it, so prompts prefilled together all wait for the last of
them: within the budget, a step takes only as many of the waiting prompts as keeps their mean wait least
(PrefillBudget.prompts_per_step).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from worker.llama_runner import LlamaRunner, PrefillChunk

log = structlog.get_logger(__name__)

MIN_PREFILL_TOKENS = 32
SMOOTHING = 0.25
"""Each full step moves the budget this fraction of the way (in ratio) towards what would have fit: a step slowed
by another process moves it little."""


def within_bounds(tokens: float, ceiling: int) -> float:
    """A step's prompt tokens kept within [MIN_PREFILL_TOKENS (or the ceiling, if lower), ceiling]."""
    return max(min(MIN_PREFILL_TOKENS, ceiling), min(tokens, ceiling))


@dataclass(frozen=True)
class StepCost:
    overhead_s: float
    per_token_s: float

    @property
    def fixed_tokens(self) -> float:
        """A step's fixed cost in prompt tokens: what one more step costs beside prefilling the same tokens."""
        return self.overhead_s / self.per_token_s

    def prefill_budget(self, step_s: float, ceiling: int) -> int:
        """Prompt tokens a step may prefill so that it takes about `step_s` (within [MIN_PREFILL_TOKENS, ceiling])."""
        return int(within_bounds((step_s - self.overhead_s) / self.per_token_s, ceiling))


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

    def prefill(tokens: int) -> None:
        runner.step([], [], [], [PrefillChunk(0, list(range(1, tokens + 1)), 0)])
        runner.synchronize()

    def seconds(tokens: int) -> float:
        return best_seconds(lambda: prefill(tokens), repeats)

    short, long = seconds(small), seconds(large)
    per_token = max((long - short) / (large - small), 1e-7)
    return StepCost(overhead_s=max(short - per_token * small, 0.0), per_token_s=per_token)


class PrefillBudget:
    """Prompt tokens a step may prefill. With `step_s`, each step that spends the whole budget corrects it towards
    the tokens that would have taken `step_s` (within [MIN_PREFILL_TOKENS, ceiling]); without, it stays fixed.
    With `fixed_tokens` (StepCost.fixed_tokens), prompts_per_step limits how many prompts share a step."""

    def __init__(
        self, tokens: int, step_s: float | None = None, ceiling: int | None = None, fixed_tokens: float | None = None
    ):
        self.tokens = tokens
        self.step_s = step_s
        self.ceiling = ceiling or tokens
        self.fixed_tokens = fixed_tokens
        self._fit = float(tokens)
        self._logged = tokens

    def observe(self, prompt_tokens: int, seconds: float) -> None:
        if self.step_s is None or prompt_tokens < self.tokens or seconds <= 0:
            return
        self._fit = within_bounds(self._fit * (self.step_s / seconds) ** SMOOTHING, self.ceiling)
        self.tokens = int(self._fit)
        if abs(self.tokens - self._logged) * 4 >= self._logged:  # moved by a quarter since last said
            log.info("worker.prefill_budget", tokens=self.tokens, step_ms=round(seconds * 1000, 1))
            self._logged = self.tokens

    def prompts_per_step(self, tokens_left: list[int], decoding: int) -> int:
        """How many of the waiting prompts (`tokens_left`: each one's prompt tokens still to prefill) the next step
        takes, beside `decoding` decoding rows.

        Prompts prefilled in one step all answer when the last of them is done; prefilled apart, each pays a step's
        fixed cost: its overhead and its decoding rows (about a prompt token each on a CPU). For n prompts of b tokens
        (at most the budget) and a fixed cost of a tokens, g prompts a step make their mean wait about
        (n / g + 1) (a + g b) / 2, least at g = sqrt(n a / b). A conversation's next turns, a hundred tokens beside a
        few decoding rows, then go one a step; a burst of short chat prompts beside many decoding rows, several."""
        if self.fixed_tokens is None or not tokens_left:
            return len(tokens_left)
        mean = sum(min(n, self.tokens) for n in tokens_left) / len(tokens_left)
        return max(1, round(math.sqrt(len(tokens_left) * (self.fixed_tokens + decoding) / mean)))
