"""Next-token choice per sequence: greedy rows in one argmax, sampled rows with their own parameters and seed."""

from __future__ import annotations

import torch

from shared.protocol import SamplingParams


def new_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator()
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def _apply_repetition_penalty(row: torch.Tensor, seen: list[int], penalty: float) -> None:
    # As in transformers' RepetitionPenaltyLogitsProcessor: shrink positive logits, grow negative ones.
    index = torch.tensor(sorted(set(seen)), dtype=torch.long, device=row.device)
    scores = row[index]
    row[index] = torch.where(scores > 0, scores / penalty, scores * penalty)


def _sample_row(row: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    if params.temperature != 1.0:
        row = row / params.temperature
    if params.top_k and params.top_k < row.shape[-1]:
        kth = torch.topk(row, params.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest set whose mass reaches top_p (always at least the most likely token).
        drop = cumulative - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def choose_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    seen_tokens: list[list[int]],
) -> list[int]:
    """logits: [rows, vocab] float32. seen_tokens[i] is only read for rows with a repetition penalty."""
    chosen = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.repetition_penalty == 1.0 and p.greedy:
            continue
        row = logits[i].clone()
        if p.repetition_penalty != 1.0:
            _apply_repetition_penalty(row, seen_tokens[i], p.repetition_penalty)
        chosen[i] = int(row.argmax()) if p.greedy else _sample_row(row, p, generators[i])
    return chosen
