"""Speculative decoding with prompt lookup (vLLM's `ngram` method): a sequence's next tokens guessed from its own
text, where the n-gram its text ends with came before, as the tokens that followed it there (an answer that quotes
its prompt or repeats itself: extraction, summaries, code edits, structured output that copies a document's fields).
The step computes the guesses as more decoding rows of the same slot at the next positions, so one forward pass
checks them all; each row's choice that matches the guess after it accepts that guess, and the first that does not is
the token after the accepted ones. Under a grammar, only the guesses it allows, each row masked as the grammar stands
after the guesses before it.

A guess's row chooses as the sequence would after the guesses before it (its penalties, minimum length and log
probabilities computed so): a greedy sequence's output is the same, in fewer steps where the guesses hold. A sampled
row draws from its own distribution and its guess counts only where the draw is that guess: speculative sampling with
a guess of probability 1, whose tokens come from the distribution decoding one at a time samples them from.

A guess that fails costs its rows (on two cores a decoding row ~1.4 ms against a one-row step's ~4.4, the default
model), so each sequence paces its guesses (Pace): after a miss it waits, longer after each, and then guesses one
token; it guesses more as guesses hold."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.protocol import SamplingParams
from shared.settings import Speculation


def speculates(params: SamplingParams) -> bool:
    """Whether a sequence guesses: not where a seed makes its sampled output repeatable (the rows of guesses that
    fail draw from its generator too, so its later draws would depend on how many it guessed)."""
    return params.greedy or params.seed is None


def draft(tokens: list[int], settings: Speculation, most: int) -> list[int]:
    """Up to `most` tokens that followed the latest earlier occurrence of the longest n-gram (prompt_lookup_max down
    to prompt_lookup_min tokens) that `tokens` ends with; [] where none occurred."""
    most = min(most, settings.num_speculative_tokens)
    if most <= 0 or len(tokens) <= settings.prompt_lookup_min:
        return []
    text = np.asarray(tokens)
    for n in range(min(settings.prompt_lookup_max, len(tokens) - 1), settings.prompt_lookup_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(text[:-1], n)  # every n-gram that ends before the last
        found = np.flatnonzero((windows == text[-n:]).all(axis=1))
        if found.size:
            start = int(found[-1]) + n
            return tokens[start : start + most]
    return []


def accepted(guesses: list[int], chosen: list[int]) -> list[int]:
    """The tokens a step gives a sequence: `chosen` holds each row's choice (the row of its last token, then one per
    guess); each choice that matches the next guess accepts it, and the first that does not ends the tokens."""
    for i, guess in enumerate(guesses):
        if chosen[i] != guess:
            return chosen[: i + 1]
    return chosen


@dataclass
class Pace:
    """How many tokens a sequence guesses: none until step `wait_until`, then `most` (at most the setting's)."""

    most: int = 1 << 16
    wait_until: int = 0
    backoff: int = 1

    def guesses(self, step: int) -> int:
        return 0 if step < self.wait_until else self.most

    def took(self, guessed: int, accepted: int, step: int) -> None:
        if accepted:
            self.backoff, self.most = 1, (1 << 16) if accepted == guessed else accepted + 1
        else:
            self.wait_until, self.backoff, self.most = step + self.backoff, min(2 * self.backoff, 64), 1
