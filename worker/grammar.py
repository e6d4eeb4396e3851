"""Structured output: a constrained sequence's llguidance matcher masks its logits row to the tokens its grammar
allows next, and follows each token chosen."""

from __future__ import annotations

from functools import cached_property

import llguidance.hf
import torch
from llguidance import LLMatcher, LLTokenizer

_BITS = torch.arange(8, dtype=torch.uint8)


class OutputGrammars:
    def __init__(self, hf_tokenizer, eos_token_ids: frozenset[int]):
        self._hf_tokenizer = hf_tokenizer
        self._eos = sorted(eos_token_ids)

    @cached_property
    def _tokenizer(self) -> LLTokenizer:
        # ~1 s, once: built at the first constrained request, not at every worker's start.
        return llguidance.hf.from_tokenizer(self._hf_tokenizer, eos_token=self._eos)

    def matcher(self, grammar: str) -> LLMatcher:
        """A matcher at the grammar's start; in its error state (`is_error`) if the grammar does not compile."""
        return LLMatcher(self._tokenizer, grammar, log_level=0)

    def masked(self, logits: torch.Tensor, rows: list[int], matchers: list[LLMatcher]) -> torch.Tensor:
        """The logits with -inf for the tokens each row's matcher does not allow next (all of them where it is in
        its error state: the caller ends those)."""
        vocab = self._tokenizer.vocab_size
        words = (vocab + 31) // 32
        bits = torch.empty((len(rows), words), dtype=torch.int32)
        for i, matcher in enumerate(matchers):
            matcher.unsafe_compute_mask_ptr(bits[i].data_ptr(), words * 4)
        # Token 32w + j is bit j of word w: little-endian, so bit j % 8 of byte 4w + j // 8.
        allowed = ((bits.view(torch.uint8)[..., None] >> _BITS) & 1).view(len(rows), -1).bool()
        width = min(logits.shape[-1], vocab)
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        masked = logits[index]
        masked[:, :width].masked_fill_(~allowed[:, :width].to(logits.device), float("-inf"))
        masked[:, width:] = float("-inf")
        return logits.index_put((index,), masked)
