"""Tool calls (function calling). Where the request names the function or requires a call, the model's output is
constrained to the call's JSON (a grammar, see gateway.structured_output), then handed back as OpenAI's tool_calls.
tool_choice 'auto' needs a model whose chat template and training announce calls in free text, and a parser of that
format (models.NAME.tool_call_parser, vLLM's --tool-call-parser): `hermes`, the <tool_call>{"name": ...,
"arguments": {...}}</tool_call> blocks of Hermes, Qwen2.5 and Qwen3. Without one, 'auto' is refused, as vLLM refuses
it without --enable-auto-tool-choice."""

from __future__ import annotations

import json
import re

from gateway import reasoning
from gateway.errors import APIError
from gateway.protocol import ChatCompletionRequest, NamedToolChoice
from shared.protocol import FinalResult, InferenceRequest

ANY = "*"
"""InferenceRequest.tool_call for tool_choice 'required': one or more calls of any of the tools."""
AUTO = "<auto>"
"""InferenceRequest.tool_call for tool_choice 'auto' (no function is named so): the output is text that may announce
calls, in the format of the model's tool-call parser."""
OPEN = "<tool_call>"
_ANNOUNCED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def tool_call_mode(body: ChatCompletionRequest, parser: str | None) -> str | None:
    if isinstance(body.tool_choice, NamedToolChoice):
        return body.tool_choice.function.name
    if body.tools and body.tool_choice in (None, "auto"):
        if parser is None:
            raise APIError(
                400, "tool_choice 'auto' is not supported by this model: send 'required', 'none' or the function to "
                "call.", param="tool_choice", code="unsupported_value",
            )  # fmt: skip
        return AUTO
    return ANY if body.tool_choice == "required" else None


def _arguments_schema(parameters: dict) -> dict:
    return parameters or {"type": "object", "properties": {}, "additionalProperties": False}


def calls_schema(body: ChatCompletionRequest) -> dict:
    """The JSON schema the output of a tool-calling request matches."""
    functions = {t.function.name: t.function for t in body.tools or []}
    if isinstance(body.tool_choice, NamedToolChoice):
        return _arguments_schema(functions[body.tool_choice.function.name].parameters)
    call = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "parameters": _arguments_schema(f.parameters)},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for name, f in functions.items()
    ]
    one_or_more = {"minItems": 1, **({"maxItems": 1} if body.parallel_tool_calls is False else {})}
    return {"type": "array", "items": {"anyOf": call}, **one_or_more}


def announced(text: str) -> tuple[str | None, list[tuple[str, str]]] | None:
    """A Hermes-format output's text before its first call, and its calls (name, arguments as JSON); None where it
    announces none, or one that does not parse (it is then answered as text, as vLLM's hermes parser does)."""
    start = text.find(OPEN)
    if start < 0:
        return None
    calls = []
    for found in _ANNOUNCED.findall(text, start):
        try:
            call = json.loads(found)
            arguments = call.get("arguments", {})
            calls.append(
                (call["name"], arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False))
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
    return (text[:start].strip() or None, calls) if calls else None


def message(request: InferenceRequest, final: FinalResult) -> tuple[dict, str]:
    """A finished choice's assistant message and finish reason: its tool calls where the request made them or the
    model announced them (an output cut short, by max_tokens or a stop string, stays text); a reasoning model's
    thinking apart."""
    text = {"role": "assistant", "content": final.text}
    if request.reasoning is not None:
        thinking, text["content"] = reasoning.split(request.reasoning, final.text)
        text["reasoning"] = thinking
    if request.tool_call is None or final.finish_reason != "stop":
        return text, final.finish_reason
    reason = "tool_calls"
    if request.tool_call == AUTO:
        found = announced(text["content"] or "")
        if found is None:
            return text, final.finish_reason
        content, calls = found
    elif request.tool_call == ANY:
        content = None
        try:
            calls = [(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in json.loads(final.text)]
        except ValueError:  # cut short by a stop string or stop token: the grammar's JSON unfinished
            return text, final.finish_reason
    else:
        content, calls = None, [(request.tool_call, final.text)]
        reason = "stop"  # as OpenAI ends a call of the function the request named
    tool_calls = [
        {"id": f"call_{final.id}_{i}", "type": "function", "function": {"name": name, "arguments": arguments}}
        for i, (name, arguments) in enumerate(calls)
    ]
    return {**text, "content": content, "tool_calls": tool_calls}, reason


class Announcing:
    """A streamed 'auto' choice's answer: sent as it comes until a call's tag begins, then held for the end (a tag
    cut between deltas held back until it shows which)."""

    def __init__(self):
        self.held = ""
        self.calling = False

    def feed(self, text: str) -> str:
        self.held += text
        if self.calling:
            return ""
        start = self.held.find(OPEN)
        if start >= 0:
            self.calling = True
        else:
            start = len(self.held) - reasoning.partial_tag(self.held, OPEN)
        sent, self.held = self.held[:start], self.held[start:]
        return sent

    def finish(self, text: str) -> str:
        """The last of the answer and all that was held, where no call came of it."""
        sent, self.held = self.held + text, ""
        return sent
