"""A reasoning model's thinking apart from its answer (vLLM's --reasoning-parser deepseek_r1 and qwen3): in a chat
response, the output's text between <think> and </think> is the message's `reasoning` (vLLM's field; it was
`reasoning_content`), the rest its `content`. The thinking is open from the output's start where the prompt ends
inside <think> (DeepSeek-R1's template, Qwen3.5's) and opens where the output starts with <think> (Qwen3's, whose
model writes the tag itself). A grammar (structured output, a named or required tool call) shapes the answer after the
thinking (gateway.structured_output.after_thinking); with models.NAME.structured_outputs_in_reasoning it shapes the
output from its first token instead, and the output is its answer unless it opens with <think>."""

from __future__ import annotations

from typing import Literal

START, END = "<think>", "</think>"

Opening = Literal["open", "closed"]


def opening(prompt_text: str, constrained: bool) -> Opening:
    return "open" if prompt_text.rstrip().endswith(START) and not constrained else "closed"


def partial_tag(text: str, tag: str) -> int:
    """How many of the text's last characters may begin `tag` (and so wait for the next delta)."""
    return next((n for n in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:n])), 0)


class Splitter:
    """A streamed output's deltas -> (reasoning, content) text ready to send, a tag cut between deltas held back."""

    def __init__(self, opened: Opening):
        self.state = "reasoning" if opened == "open" else "start"
        self.held = ""

    def feed(self, text: str) -> tuple[str, str]:
        reasoning = content = ""
        self.held += text
        while self.held:
            if self.state == "start":  # before any text but whitespace: a <think> may still open the thinking
                stripped = self.held.lstrip()
                if stripped.startswith(START):
                    self.state, self.held = "reasoning", stripped[len(START) :]
                elif START.startswith(stripped):
                    break
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                end = self.held.find(END)
                if end < 0:
                    keep = len(self.held) - partial_tag(self.held, END)
                    reasoning, self.held = reasoning + self.held[:keep], self.held[keep:]
                    break
                reasoning += self.held[:end]
                self.state, self.held = "content", self.held[end + len(END) :]
            else:
                content, self.held = content + self.held, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        held, self.held = self.held, ""
        return (held, "") if self.state == "reasoning" else ("", held)


def split(opened: Opening, text: str) -> tuple[str | None, str | None]:
    """A whole output's (reasoning, content), each None where it has none."""
    splitter = Splitter(opened)
    reasoning, content = (a + b for a, b in zip(splitter.feed(text), splitter.finish()))
    return reasoning or None, content or None


def delta(reasoning: str, content: str) -> dict:
    """A chat chunk's delta of what a Splitter gave."""
    return {**({"reasoning": reasoning} if reasoning else {}), **({"content": content} if content else {})}
