"""Who owns each KV-cache slot of the runner, and the prefix cache built on that.

A slot is free, owned by a running sequence, or parked: it keeps the KV of a finished sequence so that a later
prompt starting with the same tokens (the next turn of a conversation, the same system prompt) copies that prefix
instead of recomputing it. Parked slots are evicted least recently used first, within a token budget. Running
sequences are prefix sources too, so concurrent requests that share a system prompt compute it once. A prefix is
reused only where it was computed the same way (`computed_with`: the same LoRA adapter, the same cache salt).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Hashable, Iterable

MIN_REUSE_TOKENS = 16
"""Shorter common prefixes are recomputed: a copy is not worth it."""


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # one comparison in C: the whole of the shorter (a choice's twin, a conversation's next turn)
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class KVSlots:
    def __init__(self, slots: int, cache_tokens: int):
        self.cache_tokens = cache_tokens
        self._free = list(range(slots))  # a heap: the lowest free slot first keeps the running ones dense
        self._parked: OrderedDict[int, list[int]] = OrderedDict()  # slot -> tokens in its KV, LRU first
        self._computed_with: dict[int, Hashable] = {}  # parked slot -> how its KV was computed
        self.parked_tokens = 0
        self.evictions = 0

    def longest_prefix(
        self, prompt: list[int], running: Iterable[tuple[int, list[int], Hashable]], computed_with: Hashable = None
    ) -> tuple[int | None, int]:
        """The slot whose KV holds the longest prefix of `prompt` computed as `computed_with` says (another LoRA
        adapter's KV is not this one's; another cache salt's is not shared), and that length (at most len(prompt) - 1,
        so the last prompt token is always computed and yields the first output's logits). `running`: the running
        sequences' slots, tokens and how they compute."""
        best_slot, best = None, 0
        parked = ((slot, tokens, self._computed_with[slot]) for slot, tokens in self._parked.items())
        for slot, tokens, theirs in [*parked, *running]:
            if theirs != computed_with:
                continue
            n = min(common_prefix_len(prompt, tokens), len(prompt) - 1)
            if n > best:
                best_slot, best = slot, n
        if best < MIN_REUSE_TOKENS:
            return None, 0
        if best_slot in self._parked:
            self._parked.move_to_end(best_slot)
        return best_slot, best

    def acquire(self, source: int | None) -> int:
        """A slot for a new sequence. If the only way to get one is to evict `source` itself (a parked slot whose
        prefix we are about to reuse), that slot is handed over as it is: no copy needed."""
        if not self._free and source in self._parked and len(self._parked) == 1:
            return self._unpark(source)
        if not self._free:
            self._evict_lru()
        return heapq.heappop(self._free)

    def park(self, slot: int, tokens: list[int], computed_with: Hashable = None) -> None:
        """A sequence finished: keep its KV for reuse if the budget allows, else free the slot."""
        if len(tokens) < MIN_REUSE_TOKENS or len(tokens) > self.cache_tokens:
            heapq.heappush(self._free, slot)
            return
        self._parked[slot] = tokens
        self._computed_with[slot] = computed_with
        self.parked_tokens += len(tokens)
        while self.parked_tokens > self.cache_tokens:
            self._evict_lru()

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    def _unpark(self, slot: int) -> int:
        self.parked_tokens -= len(self._parked.pop(slot))
        del self._computed_with[slot]
        return slot

    def _evict_lru(self) -> None:
        slot = next(iter(self._parked))
        heapq.heappush(self._free, self._unpark(slot))
        self.evictions += 1
