"""The prefix cache's bookkeeping: longest prefix wins, LRU eviction within the token budget."""

from __future__ import annotations

from worker.kv_slots import MIN_REUSE_TOKENS, KVSlots

A = list(range(100, 140))
B = list(range(200, 240))


def test_the_longest_cached_prefix_is_found_and_capped_below_the_prompt_length():
    slots = KVSlots(4, cache_tokens=1000)
    slots.park(slots.acquire(None), A[:20])
    slots.park(slots.acquire(None), A[:30])
    source, reused = slots.longest_prefix(A[:30] + [7, 8], running=[])
    assert reused == 30
    source, reused = slots.longest_prefix(A[:30], running=[])
    assert reused == 29, "the last prompt token is always computed"


def test_running_sequences_are_prefix_sources_too():
    slots = KVSlots(4, cache_tokens=1000)
    assert slots.longest_prefix(B + [1], running=[(3, B, None)]) == (3, len(B))


def test_short_prefixes_are_not_reused():
    slots = KVSlots(4, cache_tokens=1000)
    slots.park(slots.acquire(None), A)
    assert slots.longest_prefix(A[: MIN_REUSE_TOKENS - 1] + [1, 2], running=[]) == (None, 0)


def test_least_recently_used_entries_are_evicted_past_the_budget():
    slots = KVSlots(8, cache_tokens=100)
    first, second, third = slots.acquire(None), slots.acquire(None), slots.acquire(None)
    slots.park(first, A)
    slots.park(second, B)
    slots.longest_prefix(A + [1], running=[])  # touches A: B is now least recently used
    slots.park(third, list(range(300, 340)))  # 120 tokens > 100: one entry must go
    assert slots.evictions == 1
    assert slots.longest_prefix(B + [1], running=[]) == (None, 0)
    assert slots.longest_prefix(A + [1], running=[])[1] == len(A)


def test_when_no_slot_is_free_a_lone_parked_source_is_handed_over_without_copy():
    slots = KVSlots(2, cache_tokens=1000)
    running = slots.acquire(None)
    parked = slots.acquire(None)
    slots.park(parked, A)
    source, _ = slots.longest_prefix(A + [1], running=[(running, B, None)])
    assert slots.acquire(source) == parked


def test_a_prefix_is_reused_only_where_it_was_computed_the_same_way():
    slots = KVSlots(4, 1000)
    prompt = list(range(40))
    slots.park(slots.acquire(None), prompt, ("tuned", None))
    assert slots.longest_prefix(prompt + [7], [], None) == (None, 0)
    assert slots.longest_prefix(prompt + [7], [], ("tuned", "salt")) == (None, 0)
    assert slots.longest_prefix(prompt + [7], [], ("tuned", None))[1] == 40
