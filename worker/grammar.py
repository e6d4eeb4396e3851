"""Structured output: a constrained sequence's llguidance matcher masks its logits row to the tokens its grammar
allows next, and follows each token chosen."""

from __future__ import annotations

from functools import cached_property

import llguidance.hf
import numpy as np
import torch
from llguidance import LLExecutor, LLMatcher, LLTokenizer


class OutputGrammars:
    def __init__(self, hf_tokenizer, eos_token_ids: frozenset[int]):
        self._hf_tokenizer = hf_tokenizer
        self._eos = sorted(eos_token_ids)

    @cached_property
    def _tokenizer(self) -> LLTokenizer:
        # ~0.4 s, once: built at the first constrained request rather than at every start.
        return llguidance.hf.from_tokenizer(self._hf_tokenizer, eos_token=self._eos)

    @cached_property
    def _executor(self) -> LLExecutor:
        return LLExecutor()

    def matcher(self, grammar: str) -> LLMatcher:
        """A matcher at the grammar's start; in its error state (`is_error`) if the grammar does not compile."""
        return LLMatcher(self._tokenizer, grammar, log_level=0)

    def masked(self, logits: torch.Tensor, constrained: list[tuple[int, LLMatcher, list[int]]]) -> torch.Tensor:
        """The logits with -inf for the tokens each constrained row's matcher does not allow next (all of them where
        it is in its error state: the caller ends those). `constrained`: (row, matcher, guesses) per sequence, the
        rows after `row` its guesses' (speculative decoding), each masked as the matcher would be after the guesses
        before it; the guesses must be ones the matcher allows (LLMatcher.validate_tokens)."""
        vocab = self._tokenizer.vocab_size
        words = (vocab + 31) // 32
        rows = [row + i for row, _, guesses in constrained for i in range(len(guesses) + 1)]
        bits = torch.empty((len(rows), words), dtype=torch.int32)
        # The matchers fill their masks in parallel, on the executor's threads (the model is idle meanwhile), as
        # llguidance.torch.fill_next_token_bitmask_par does; that module compiles with torch.compile on import. A
        # matcher follows its guesses to mask their rows, and is rolled back.
        plain, guessing, first = [], [], 0
        for _, matcher, guesses in constrained:
            (guessing if guesses else plain).append((matcher, first, guesses))
            first += len(guesses) + 1
        into = (bits.data_ptr(), words * 4, len(rows))
        if plain:
            self._executor.unsafe_compute_mask_ptr([(m, at) for m, at, _ in plain], *into)
        if guessing:  # (it takes no empty list of guesses)
            self._executor.unsafe_compute_mask_ptr_with_draft_token(guessing, *into)
        # Token 32w + j is bit j of word w: the int32s' bytes, little-endian, least significant bit first.
        allowed = np.unpackbits(bits.numpy().view(np.uint8), axis=-1, bitorder="little").view(np.bool_)
        width = min(vocab, logits.shape[-1])
        banned = torch.zeros(logits.shape, dtype=torch.bool)
        banned[rows, width:] = True  # positions the model has beyond the tokenizer's vocabulary
        banned[rows, :width] = torch.from_numpy(~allowed[:, :width])
        return logits.masked_fill(banned.to(logits.device), float("-inf"))
