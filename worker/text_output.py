"""Turns generated token ids into text as they arrive: incremental decoding and stop strings.

Text is released only when it is final: never half a UTF-8 character, and never the start of what could still
become a stop string (the stop text itself is returned only when asked: vLLM's include_stop_str_in_output)."""

from __future__ import annotations


class TextOutput:
    def __init__(
        self,
        tokenizer,
        stop: list[str],
        min_tokens: int = 0,
        skip_special_tokens: bool = True,
        include_stop: bool = False,
    ):
        """Stop strings end the text only from the min_tokens-th token on (vLLM's min_tokens)."""
        self._tokenizer = tokenizer
        self._include_stop = include_stop
        self._skip_special_tokens = skip_special_tokens
        self._stop = [s for s in stop if s]
        self._min_tokens = min_tokens
        self._ids: list[int] = []
        self._prefix = 0  # decode window start: enough context for the tokenizer to place spaces right
        self._read = 0  # ids already turned into text
        self.text = ""
        self._released = 0
        self.stopped = False
        self.stop_string: str | None = None
        """The stop string that ended the text, once one has."""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Add one generated token; return the text that became final (may be empty)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            searched_from = max(0, len(self.text) - max((len(s) for s in self._stop), default=0))
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)
            if self._stop and len(self._ids) >= self._min_tokens:
                self._cut_at_stop(searched_from)
        return self._release(final=self.stopped)

    def _cut_at_stop(self, searched_from: int) -> None:
        hits = [(i, s) for i, s in ((self.text.find(s, searched_from), s) for s in self._stop) if i >= 0]
        if hits:
            at, self.stop_string = min(hits)
            self.text = self.text[: at + len(self.stop_string) if self._include_stop else at]
            self.stopped = True

    def finish(self) -> str:
        """The generation ended: release what was held back."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            end -= self._held_back()
        delta = self.text[self._released : end] if end > self._released else ""
        self._released = max(self._released, end)
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
