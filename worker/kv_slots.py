"""Who owns each KV-cache slot of the runner, and the prefix cache built on that.

A slot is free, owned by a running sequence, or parked: it keeps the KV of a finished sequence so that a later
prompt starting with the same tokens (the next turn of a conversation, the same system prompt) copies that prefix
instead of recomputing it. Parked slots are evicted least recently used first, within a token budget. Running
sequences are prefix sources too, so concurrent requests that share a system prompt compute it once.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable

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
        self._adapters: dict[int, str | None] = {}  # parked slot -> the LoRA adapter its KV was computed with
        self.parked_tokens = 0
        self.evictions = 0

    def longest_prefix(
        self, prompt: list[int], running: Iterable[tuple[int, list[int], str | None]], adapter: str | None = None
    ) -> tuple[int | None, int]:
        """The slot whose KV holds the longest prefix of `prompt` computed with the same LoRA adapter (another one's
        KV is not this one's), and that length (at most len(prompt) - 1, so the last prompt token is always computed
        and yields the first output's logits). `running`: the running sequences' slots, tokens and adapters."""
        best_slot, best = None, 0
        parked = ((slot, tokens, self._adapters[slot]) for slot, tokens in self._parked.items())
        for slot, tokens, computed_with in [*parked, *running]:
            if computed_with != adapter:
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

    def park(self, slot: int, tokens: list[int], adapter: str | None = None) -> None:
        """A sequence finished: keep its KV for reuse if the budget allows, else free the slot."""
        if len(tokens) < MIN_REUSE_TOKENS or len(tokens) > self.cache_tokens:
            heapq.heappush(self._free, slot)
            return
        self._parked[slot] = tokens
        self._adapters[slot] = adapter
        self.parked_tokens += len(tokens)
        while self.parked_tokens > self.cache_tokens:
            self._evict_lru()

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    def _unpark(self, slot: int) -> int:
        self.parked_tokens -= len(self._parked.pop(slot))
        del self._adapters[slot]
        return slot

    def _evict_lru(self) -> None:
        slot = next(iter(self._parked))
        heapq.heappush(self._free, self._unpark(slot))
        self.evictions += 1
