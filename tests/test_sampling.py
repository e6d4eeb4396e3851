"""Sampled tokens: the nucleus is the smallest most-likely set reaching top_p, draws follow its renormalized
probabilities, and a seed repeats them."""

from __future__ import annotations

import collections

import torch

from shared.protocol import SamplingParams
from worker.sampling import _nucleus, choose_tokens, new_generator

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])  # probabilities .563 .207 .126 .076 .028


def test_the_nucleus_is_the_smallest_most_likely_set_reaching_top_p():
    probs = torch.softmax(LOGITS[0], dim=-1)
    for top_p, expected in ((0.5, [0]), (0.8, [0, 1, 2]), (0.95, [0, 1, 2, 3]), (0.999, [0, 1, 2, 3, 4])):
        assert _nucleus(probs, top_p)[1].tolist() == expected


def test_draws_follow_the_nucleus_probabilities_and_repeat_with_a_seed():
    params = SamplingParams(max_tokens=1, top_p=0.8, seed=7)

    def draws(n: int) -> list[int]:
        generator = new_generator(params)
        return [choose_tokens(LOGITS, [params], [generator], [[]])[0] for _ in range(n)]

    counts = collections.Counter(draws(4000))
    assert set(counts) == {0, 1, 2}
    probs = torch.softmax(LOGITS[0, :3], dim=-1)
    for token, p in enumerate(probs.tolist()):
        assert abs(counts[token] / 4000 - p) < 0.03
    assert draws(50) == draws(50)


def test_greedy_rows_take_the_first_of_tied_highest_logits_as_argmax_does():
    logits = (torch.randn(8, 49152, generator=torch.Generator().manual_seed(0)) * 2).round().bfloat16()  # many ties
    logits[3, [7, 9000]] = 100  # two equal maxima: the first wins
    greedy = [SamplingParams(max_tokens=1, temperature=0)] * 8
    chosen = choose_tokens(logits, greedy, [None] * 8, [[]] * 8)
    assert chosen == logits.float().argmax(dim=-1).tolist() and chosen[3] == 7
