"""Log probabilities the worker reports, in the shape each OpenAI endpoint gives them."""

from __future__ import annotations

from typing import Literal

from shared.protocol import TokenLogprob


def _entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", errors="replace"))}


def token_entries(logprobs: list[TokenLogprob]) -> list[dict]:
    """Chat's and the Responses API's shape: each token's {token, logprob, bytes, top_logprobs}."""
    return [{**_entry(lp.token, lp.logprob), "top_logprobs": [_entry(t, v) for t, v in lp.top]} for lp in logprobs]


class LogprobsFormat:
    """Chat: `{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}`. Completions: the legacy
    `{tokens, token_logprobs, top_logprobs, text_offset}`, whose offsets count on across a stream's chunks."""

    def __init__(self, kind: Literal["chat", "text"]):
        self.kind = kind
        self.offset = 0

    def format(self, logprobs: list[TokenLogprob]) -> dict:
        if self.kind == "chat":
            return {"content": token_entries(logprobs), "refusal": None}
        offsets = []
        for lp in logprobs:
            offsets.append(self.offset)
            self.offset += len(lp.token)
        return {
            "tokens": [lp.token for lp in logprobs],
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [None if lp.logprob is None else dict(lp.top) for lp in logprobs],
            "text_offset": offsets,
        }


def prompt_entries(logprobs: list[TokenLogprob]) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: for each prompt token (None for the first, which nothing predicts), {token id:
    {logprob, rank, decoded_token}} of that token and of the most likely tokens at its place."""
    entries: list[dict | None] = []
    for lp in logprobs:
        if lp.logprob is None:
            entries.append(None)
            continue
        entry = {lp.token_id: {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.token}}
        for rank, ((token, logprob), token_id) in enumerate(zip(lp.top, lp.top_ids), start=1):
            entry.setdefault(token_id, {"logprob": logprob, "rank": rank, "decoded_token": token})
        entries.append(entry)
    return entries
