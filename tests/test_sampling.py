"""Sampled tokens: the nucleus is the smallest most-likely set reaching top_p, draws follow its renormalized
probabilities, and a seed repeats them."""

from __future__ import annotations

import collections

import pytest
import torch

from shared.protocol import SamplingParams
from worker.sampling import _nucleus, _typical, choose_tokens, new_generator, token_logprobs

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])  # probabilities .563 .207 .126 .076 .028


def test_the_nucleus_is_the_smallest_most_likely_set_reaching_top_p():
    probs = torch.softmax(LOGITS[0], dim=-1)
    for top_p, expected in ((0.5, [0]), (0.8, [0, 1, 2]), (0.95, [0, 1, 2, 3]), (0.999, [0, 1, 2, 3, 4])):
        assert _nucleus(probs, top_p)[1].tolist() == expected


def test_draws_follow_the_nucleus_probabilities_and_repeat_with_a_seed():
    params = SamplingParams(max_tokens=1, top_p=0.8, seed=7)

    def draws(n: int) -> list[int]:
        generator = new_generator(params)
        return [choose_tokens(LOGITS, [params], [generator], [[]], [[]])[0] for _ in range(n)]

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
    chosen = choose_tokens(logits, greedy, [None] * 8, [[]] * 8, [[]] * 8)
    assert chosen == logits.float().argmax(dim=-1).tolist() and chosen[3] == 7


def test_presence_and_frequency_penalties_lower_generated_tokens_by_openais_formula():
    """logit - count * frequency - (count > 0) * presence, counted over generated tokens only (not the prompt)."""
    logits = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.0]])

    def greedy(prompt: list[int], generated: list[int], **penalties) -> int:
        params = SamplingParams(max_tokens=1, temperature=0, **penalties)
        return choose_tokens(logits, [params], [None], [prompt], [generated])[0]

    assert greedy([], [0]) == 0, "no penalty: the highest logit"
    assert greedy([], [0], presence_penalty=0.6) == 1, "3.0 - 0.6 < 2.5"
    assert greedy([], [0, 1], presence_penalty=0.6) == 0, "both lowered by the same 0.6"
    assert greedy([], [0, 0], frequency_penalty=0.3) == 1, "3.0 - 2 x 0.3 < 2.5"
    assert greedy([], [0], frequency_penalty=0.3) == 0, "3.0 - 0.3 > 2.5"
    assert greedy([0, 0, 0], [], presence_penalty=2.0, frequency_penalty=2.0) == 0, "prompt tokens are not counted"
    assert greedy([], [1, 2], presence_penalty=-1.0) == 1, "a negative penalty favours what was generated"
    assert logits[0, 0] == 3.0, "the step's logits are left as they were"


def test_token_logprobs_are_the_log_softmax_of_the_chosen_token_and_the_most_likely():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)).bfloat16()
    expected = torch.log_softmax(logits.float(), dim=-1)
    found = token_logprobs(logits, [7, 0, 49], [0, 3, 1], ranked=True)
    for (chosen, alternatives, rank), row, token, k in zip(found, expected, [7, 0, 49], [0, 3, 1]):
        assert chosen == pytest.approx(float(row[token]))
        assert rank == int((row > row[token]).sum()) + 1
        ids = [i for i, _ in alternatives]
        assert ids == row.topk(k).indices.tolist() and len(ids) == k
        assert [v for _, v in alternatives] == pytest.approx(row.topk(k).values.tolist())
    assert all(rank is None for *_, rank in token_logprobs(logits, [7, 0, 49], [0, 3, 1])), "ranks only when asked"


@pytest.mark.parametrize("mass", [0.2, 0.9, 0.999])
def test_typical_sampling_keeps_the_tokens_transformers_warper_keeps(mass):
    from transformers.generation.logits_process import TypicalLogitsWarper

    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(3)) * 3
    for row in logits:
        kept = torch.isfinite(_typical(row.clone(), mass))
        expected = torch.isfinite(TypicalLogitsWarper(mass)(None, row[None].clone())[0])
        assert torch.equal(kept, expected)


def test_allowed_token_ids_leave_only_those_tokens_greedy_and_sampled():
    logits = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.0]])
    greedy = SamplingParams(max_tokens=1, temperature=0, allowed_token_ids=[2, 4])
    assert choose_tokens(logits, [greedy], [None], [[]], [[]]) == [2]
    draws = set()
    for seed in range(40):
        sampled = SamplingParams(max_tokens=1, temperature=1.0, allowed_token_ids=[1, 3], seed=seed)
        draws.add(choose_tokens(logits, [sampled], [new_generator(sampled)], [[]], [[]])[0])
    assert draws <= {1, 3} and len(draws) == 2


def test_bad_words_rule_out_a_words_last_token_where_the_output_ends_with_the_rest():
    logits = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.0]])
    params = SamplingParams(max_tokens=1, temperature=0, bad_words_token_ids=[[0], [3, 1]])
    assert choose_tokens(logits, [params], [None], [[]], [[]]) == [1], "a one-token word is never generated"
    assert choose_tokens(logits, [params], [None], [[]], [[2]]) == [1]
    assert choose_tokens(logits, [params], [None], [[]], [[2, 3]]) == [2], "after 3, the word [3, 1] is not finished"


def test_logit_bias_is_added_to_its_tokens_logits_greedy_rows_included():
    logits = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.0]])

    def greedy(bias: dict[int, float]) -> int:
        params = SamplingParams(max_tokens=1, temperature=0, logit_bias=bias)
        return choose_tokens(logits, [params], [None], [[]], [[]])[0]

    assert greedy({0: -100}) == 1, "-100 bans a token"
    assert greedy({4: 3.5}) == 4, "0.0 + 3.5 > 3.0"
    assert greedy({4: 2.5, 3: 2.5}) == 3, "1.0 + 2.5 > 0.0 + 2.5 and 3.0"
    sampled = SamplingParams(max_tokens=1, logit_bias={k: -100 for k in range(4)}, seed=1)
    draws = {choose_tokens(logits, [sampled], [new_generator(sampled)], [[]], [[]])[0] for _ in range(20)}
    assert draws == {4}, "sampled rows never draw a banned token"


def test_min_tokens_rules_out_the_end_and_stop_tokens_until_reached():
    logits = torch.tensor([[1.0, 3.0, 2.5, 2.0, 0.0]])  # 1: end of sequence, then 2, then 3

    def greedy(generated: int, **params) -> int:
        sampling = SamplingParams(max_tokens=9, temperature=0, **params)
        return choose_tokens(logits, [sampling], [None], [[]], [[7] * generated], frozenset({1}))[0]

    assert greedy(0) == 1
    assert greedy(0, min_tokens=2) == 2 and greedy(1, min_tokens=2) == 2
    assert greedy(2, min_tokens=2) == 1, "reached: the end token is allowed again"
    assert greedy(0, min_tokens=1, stop_token_ids=[2]) == 3, "the row's stop tokens too"


def test_min_p_samples_only_tokens_at_least_that_fraction_of_the_most_likely():
    # probabilities .563 .207 .126 .076 .028: min_p 0.2 keeps the first three (0.2 x .563 = .113)
    params = SamplingParams(max_tokens=1, min_p=0.2, seed=3)
    generator = new_generator(params)
    counts = collections.Counter(choose_tokens(LOGITS, [params], [generator], [[]], [[]])[0] for _ in range(3000))
    assert set(counts) == {0, 1, 2}
    probs = torch.softmax(LOGITS[0, :3], dim=-1)
    for token, p in enumerate(probs.tolist()):
        assert abs(counts[token] / 3000 - p) < 0.03
