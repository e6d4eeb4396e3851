"""Tool calls (function calling). Where the request names the function or requires a call, the model's output is
constrained to the call's JSON (a grammar, see gateway.structured_output), then handed back as OpenAI's tool_calls.
tool_choice 'auto' needs a model whose chat template and training announce calls in free text, and a parser of that
format (models.NAME.tool_call_parser, vLLM's --tool-call-parser; FORMATS). Without one, 'auto' is refused, as vLLM
refuses it without --enable-auto-tool-choice."""

from __future__ import annotations

import json

from gateway import reasoning
from gateway.errors import APIError
from gateway.protocol import ChatCompletionRequest, NamedToolChoice
from gateway.tool_call_formats import FORMATS, Calls, Format, Leading
from shared.protocol import FinalResult, InferenceRequest

ANY = "*"
"""InferenceRequest.tool_call for tool_choice 'required': one or more calls of any of the tools."""
_AUTO = "<auto:"
"""InferenceRequest.tool_call for tool_choice 'auto' begins so, the parser's name after it (no function is named so):
the output is text that may announce calls in that parser's format."""


def tool_call_mode(body: ChatCompletionRequest, parser: str | None) -> str | None:
    if isinstance(body.tool_choice, NamedToolChoice):
        return body.tool_choice.function.name
    if body.tools and body.tool_choice in (None, "auto"):
        if parser is None:
            raise APIError(
                400, "tool_choice 'auto' is not supported by this model: send 'required', 'none' or the function to "
                "call.", param="tool_choice", code="unsupported_value",
            )  # fmt: skip
        return f"{_AUTO}{parser}>"
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


def keeps_special_tokens(tool_call: str | None) -> bool:
    """Whether the output's special tokens stay in its text, as the format of the calls it may announce needs."""
    form = announcing(tool_call)
    return isinstance(form, Leading) and form.special_tokens


def announcing(tool_call: str | None) -> Format | None:
    """The format of the calls a request's output may announce: its parser's, for tool_choice 'auto'."""
    return FORMATS[tool_call[len(_AUTO) : -1]] if tool_call and tool_call.startswith(_AUTO) else None


def announced(form: Format, text: str) -> tuple[str | None, Calls] | None:
    """An output's text before its first call, and its calls; None where it announces none, or one that does not
    parse (it is then answered as text, as vLLM's parsers do)."""
    try:
        return form.read(text)
    except (ValueError, KeyError, TypeError, AttributeError, SyntaxError, RecursionError):
        return None


def message(request: InferenceRequest, final: FinalResult) -> tuple[dict, str]:
    """A finished choice's assistant message and finish reason: its tool calls where the request made them or the
    model announced them (an output cut short, by max_tokens or a stop string, stays text); a reasoning model's
    thinking apart."""
    text = {"role": "assistant", "content": final.text}
    if request.reasoning is not None:
        thinking, text["content"] = reasoning.split(request.reasoning, final.text)
        if request.include_reasoning:
            text["reasoning"] = thinking
    if request.tool_call is None or final.finish_reason != "stop":
        return text, final.finish_reason
    reason = "tool_calls"
    if form := announcing(request.tool_call):
        found = announced(form, text["content"] or "")
        if found is None:
            return text, final.finish_reason
        content, calls = found
    elif request.tool_call == ANY:
        content = None
        try:
            listed = json.loads(text["content"] or "")
            calls = [(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in listed]
        except ValueError:  # cut short by a stop string or stop token: the grammar's JSON unfinished
            return text, final.finish_reason
    else:
        content, calls = None, [(request.tool_call, (text["content"] or "").strip())]
        reason = "stop"  # as OpenAI ends a call of the function the request named
    tool_calls = [
        {"id": f"call_{final.id}_{i}", "type": "function", "function": {"name": name, "arguments": arguments}}
        for i, (name, arguments) in enumerate(calls)
    ]
    return {**text, "content": content, "tool_calls": tool_calls}, reason


class Announcing:
    """A streamed 'auto' choice's answer: sent as it comes until a call begins, then held for the end (text that may
    still begin one held back until it shows which)."""

    def __init__(self, form: Format):
        self.form = form
        self.text = ""
        self.sent = 0
        self.calling = False

    @property
    def held(self) -> str:
        return self.text[self.sent :]

    def feed(self, text: str) -> str:
        self.text += text
        if self.calling:
            return ""
        start = self.form.start(self.text)
        if start is not None:
            self.calling = True
        else:
            start = len(self.text) - self.form.undecided(self.text)
        sent, self.sent = self.text[self.sent : start], start
        return sent

    def finish(self, text: str) -> str:
        """The last of the answer and all that was held, where no call came of it."""
        sent = self.held + text
        self.text, self.sent = "", 0
        return sent
