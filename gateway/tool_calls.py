"""Tool calls (function calling) where the request names the function or requires a call: the model's output is
constrained to the call's JSON (a grammar, see gateway.structured_output), then handed back as OpenAI's tool_calls.
tool_choice 'auto' is refused: this model has no trained way of announcing a call in free text (vLLM too needs a
tool-call parser for the model to offer it)."""

from __future__ import annotations

import json

from gateway import reasoning
from gateway.protocol import ChatCompletionRequest, NamedToolChoice
from shared.protocol import FinalResult, InferenceRequest

ANY = "*"
"""InferenceRequest.tool_call for tool_choice 'required': one or more calls of any of the tools."""


def tool_call_mode(body: ChatCompletionRequest) -> str | None:
    if isinstance(body.tool_choice, NamedToolChoice):
        return body.tool_choice.function.name
    return ANY if body.tool_choice == "required" else None


def _arguments_schema(parameters: dict) -> dict:
    return parameters or {"type": "object", "properties": {}, "additionalProperties": False}


def calls_schema(body: ChatCompletionRequest) -> dict:
    """The JSON schema the output of a tool-calling request matches."""
    functions = {t.function.name: t.function for t in body.tools or []}
    mode = tool_call_mode(body)
    if mode != ANY:
        return _arguments_schema(functions[mode].parameters)
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


def message(request: InferenceRequest, final: FinalResult) -> tuple[dict, str]:
    """A finished choice's assistant message and finish reason: its tool calls where the request made them (an
    output cut short, by max_tokens or a stop string, stays text); a reasoning model's thinking apart."""
    text = {"role": "assistant", "content": final.text}, final.finish_reason
    if request.reasoning is not None:
        thinking, answer = reasoning.split(request.reasoning, final.text)
        text = {"role": "assistant", "content": answer, "reasoning": thinking}, final.finish_reason
    if request.tool_call is None or final.finish_reason != "stop":
        return text
    if request.tool_call == ANY:
        try:
            calls = [(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in json.loads(final.text)]
        except ValueError:  # cut short by a stop string or stop token: the grammar's JSON unfinished
            return text
        reason = "tool_calls"
    else:
        calls = [(request.tool_call, final.text)]
        reason = "stop"  # as OpenAI ends a call of the function the request named
    tool_calls = [
        {"id": f"call_{final.id}_{i}", "type": "function", "function": {"name": name, "arguments": arguments}}
        for i, (name, arguments) in enumerate(calls)
    ]
    return {"role": "assistant", "content": None, "tool_calls": tool_calls}, reason


def streamed(request: InferenceRequest, final: FinalResult) -> tuple[dict, str]:
    """A streamed tool-calling choice's one delta, sent when it has ended, and its finish reason."""
    message_, reason = message(request, final)
    if message_["content"] is not None:
        return {"content": message_["content"]}, reason
    return {"tool_calls": [{"index": i, **call} for i, call in enumerate(message_["tool_calls"])]}, reason
