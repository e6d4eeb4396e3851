"""Structured output: OpenAI's `response_format` or vLLM's `structured_outputs` as the llguidance grammar a worker
constrains the output with (SamplingParams.grammar). A grammar that does not compile is a 400 here, before anything
is queued."""

from __future__ import annotations

import json

from llguidance import LLMatcher, grammar_from

from gateway import reasoning
from gateway.errors import APIError
from gateway.prompts import PromptTokenizer
from gateway.protocol import ChatCompletionRequest, CompletionRequest, ResponseFormat, StructuredOutputs
from gateway.tool_calls import calls_schema

_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""JSON laid out as json.dumps writes it: with free whitespace a small model tends to fill its output with newlines.
A schema's own "x-guidance" options override these."""

_ANY_OBJECT = {"type": "object"}


def output_grammar(body: ChatCompletionRequest | CompletionRequest, tokenizer: PromptTokenizer) -> str | None:
    """The grammar the request's output must match (tool calls' included), or None for free text."""
    response_format = body.response_format if body.response_format and body.response_format.type != "text" else None
    calls_tools = isinstance(body, ChatCompletionRequest) and body.calls_tools
    if response_format is None and body.structured_outputs is None and not calls_tools:
        return None
    if response_format is not None and body.structured_outputs is not None:
        raise APIError(
            400, "Give 'response_format' or 'structured_outputs', not both.", param="structured_outputs",
            code="invalid_value",
        )  # fmt: skip
    param = "tools" if calls_tools else "response_format" if response_format else "structured_outputs"
    try:
        if calls_tools:
            grammar = json_grammar(calls_schema(body))
        elif response_format:
            grammar = _from_response_format(response_format)
        else:
            grammar = _from_vllm(body.structured_outputs)
        error = LLMatcher.validate_grammar(grammar, tokenizer.grammar_tokenizer)
    except ValueError as exc:
        error = str(exc)
    if error:
        raise APIError(400, f"'{param}' does not compile: {error.strip()}", param=param, code="invalid_value")
    return grammar


_THOUGHT = r"/{}(?s:.*)<\/think>[ \t\r\n]*/ & ~/(?s:.*<\/think>.*<\/think>.*)/"
"""Any text up to the first </think> (after a <think> where given), and the whitespace after it."""


def after_thinking(grammar: str, opened: reasoning.Opening) -> str:
    """The grammar preceded by a reasoning model's free thinking: the rest of the thinking the prompt opened, or one
    the output may open with <think> (a thinking the output does not open: the grammar from its first token)."""
    try:
        top = json.loads(grammar)
    except ValueError:  # Lark text
        top = {"grammars": [{"lark_grammar": grammar}]}
    answer = top["grammars"][0]
    answer["name"] = answer.get("name") or "answer"
    optional, opener = ("", "") if opened == "open" else ("?", "<think>")
    lark = f"start: THOUGHT{optional} @{answer['name']}\nTHOUGHT: {_THOUGHT.format(opener)}\n"
    return json.dumps({**top, "grammars": [{"lark_grammar": lark}, *top["grammars"]]})


def json_grammar(schema: dict | str) -> str:
    return LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)


def _from_response_format(response_format: ResponseFormat) -> str:
    if response_format.type == "json_object":
        return json_grammar(_ANY_OBJECT)
    return json_grammar(response_format.json_schema.schema_)


def _from_vllm(outputs: StructuredOutputs) -> str:
    if outputs.json_ is not None:
        return json_grammar(json.loads(outputs.json_) if isinstance(outputs.json_, str) else outputs.json_)
    if outputs.regex is not None:
        return grammar_from("regex", outputs.regex)
    if outputs.choice is not None:
        return grammar_from("choice", outputs.choice)
    if outputs.grammar is not None:
        return grammar_from("grammar", outputs.grammar)  # Lark, or GBNF converted to it
    return json_grammar(_ANY_OBJECT)
