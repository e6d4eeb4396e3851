"""The deltas of a streamed chat choice: its text as `content` as it comes, a reasoning model's thinking as
`reasoning` (gateway.reasoning), and its tool calls whole when it ends (gateway.tool_calls): a named or required
call's JSON (and a reasoning model's thinking before it) held from the start, an announced call from where it
begins."""

from __future__ import annotations

from gateway import reasoning, tool_calls
from shared.protocol import FinalResult, InferenceRequest


class ChoiceDeltas:
    def __init__(self, request: InferenceRequest):
        self.request = request
        self.thinking = reasoning.Splitter(request.reasoning) if request.reasoning else None
        form = tool_calls.announcing(request.tool_call)
        self.announcing = tool_calls.Announcing(form) if form else None
        self.whole = request.tool_call is not None and form is None
        """A call the grammar writes: nothing goes out before the choice ends."""

    def feed(self, text: str) -> dict | None:
        """The delta of an output delta's text ({}: nothing to send yet); None while the choice sends nothing."""
        if self.whole:
            return None
        thought, answer = self.thinking.feed(text) if self.thinking else ("", text)
        if self.announcing:
            answer = self.announcing.feed(answer)
        return self._delta(thought, answer)

    def finish(self, final: FinalResult) -> tuple[dict, str]:
        """The choice's last delta (its calls, or what was held back) and its finish reason."""
        message, reason = tool_calls.message(self.request, final)
        calls = [{"index": i, **call} for i, call in enumerate(message.get("tool_calls") or [])]
        if self.whole:  # nothing went out before: a reasoning model's thinking, and the calls (cut short: the text)
            text = None if calls else message["content"]
            sent = {"reasoning": message.get("reasoning"), "tool_calls": calls, "content": text}
            return {k: v for k, v in sent.items() if v}, reason
        if calls:
            return {"tool_calls": calls}, reason
        thought, answer = self.thinking.finish() if self.thinking else ("", "")
        if self.announcing:
            answer = self.announcing.finish(answer)
        return self._delta(thought, answer), reason

    def _delta(self, thought: str, answer: str) -> dict:
        return reasoning.delta(thought if self.request.include_reasoning else "", answer)
