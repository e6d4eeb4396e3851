"""The formats in which models announce tool calls in their text (tool_choice 'auto'), by the names of vLLM's
--tool-call-parser: where a call may begin in a streamed output, and the calls a whole output announces."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from gateway import reasoning

_SPACE = re.compile(r"\s*")
Calls = list[tuple[str, str]]
"""Announced calls: (name, arguments as JSON)."""


def _call(name, arguments) -> tuple[str, str]:
    if not isinstance(name, str) or not isinstance(arguments, str | dict):
        raise TypeError(name)
    return name, arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


class Tagged:
    """Calls each in a tag, after any text: hermes, the <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks
    of Hermes, Qwen2.5 and Qwen3."""

    OPEN = "<tool_call>"
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)

    def start(self, text: str) -> int | None:
        found = text.find(self.OPEN)
        return found if found >= 0 else None

    def undecided(self, text: str) -> int:
        return reasoning.partial_tag(text, self.OPEN)

    def read(self, text: str) -> tuple[str | None, Calls] | None:
        start = self.start(text)
        if start is None:
            return None
        calls = []
        for found in self._BLOCK.findall(text, start):
            call = json.loads(found)
            calls.append(_call(call["name"], call.get("arguments", {})))
        return (text[:start].strip() or None, calls) if calls else None


@dataclass(frozen=True)
class Leading:
    """Calls that are the whole output, from its start: llama3_json (Llama 3.1-3.3), pythonic (Llama 3.2, 4), mistral.
    The special token before them (`marker`) is mostly skipped with the others, unless the format needs the special
    tokens kept in the text (`special_tokens`: Mistral's v11 tokenizer and later, whose calls are special tokens and
    names, `[TOOL_CALLS]name[ARGS]{...}`)."""

    opener: str
    calls: Callable[[str], Calls]
    marker: str | None = None
    special_tokens: bool = False

    def _openers(self) -> tuple[str, ...]:
        return (self.opener, self.marker) if self.marker else (self.opener,)

    def start(self, text: str) -> int | None:
        return 0 if text.startswith(self._openers(), _SPACE.match(text).end()) else None

    def undecided(self, text: str) -> int:
        at = _SPACE.match(text).end()
        if len(text) - at > max(map(len, self._openers())):  # no copy of a long text at every delta
            return 0
        return len(text) if any(o.startswith(text[at:]) for o in self._openers()) else 0

    def read(self, text: str) -> tuple[str | None, Calls] | None:
        if self.start(text) is None:
            return None
        calls = self.calls(text.strip().removeprefix(self.marker or "").lstrip())
        return (None, calls) if calls else None


def _json_objects(text: str) -> Calls:
    """llama3_json: {"name": ..., "parameters": {...}} objects, one after another or separated by ';'."""
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(text):
        call, at = decoder.raw_decode(text, at)
        calls.append(_call(call["name"], call.get("parameters", call.get("arguments", {}))))
        at = len(text) - len(text[at:].lstrip().removeprefix(";").lstrip())
    return calls


_LITERALS = {"true": True, "false": False, "null": None}


def _python_calls(text: str) -> Calls:
    """pythonic: [get_weather(city="Paris"), get_time()], keyword arguments of literal values."""
    listed = ast.parse(text, mode="eval").body
    if not isinstance(listed, ast.List):
        raise ValueError(text)
    calls = []
    for call in listed.elts:
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)) or call.args:
            raise ValueError(text)
        if any(k.arg is None for k in call.keywords):  # **mapping
            raise ValueError(text)
        arguments = {
            k.arg: _LITERALS[k.value.id] if isinstance(k.value, ast.Name) else ast.literal_eval(k.value)
            for k in call.keywords
        }
        calls.append(_call(call.func.id, arguments))
    return calls


_MISTRAL_CALL = re.compile(r"\s*([A-Za-z_][\w.-]*)(?:\[CALL_ID\]\w+)?(?:\[ARGS\])?\s*(\{.*\})\s*", re.S)
"""A call of Mistral's v11 tokenizer and later: its name, its id (v13), its arguments' JSON object."""


def _mistral_calls(text: str) -> Calls:
    """mistral: [{"name": ..., "arguments": {...}}, ...] before its v11 tokenizer; from v11 on, name[ARGS]{...} for
    each call, each after a [TOOL_CALLS] (the first one's taken off already)."""
    if text.startswith("["):
        listed = json.loads(text)
        if not isinstance(listed, list):
            raise ValueError(text)
        return [_call(c["name"], c.get("arguments", {})) for c in listed]
    calls = []
    for piece in text.split("[TOOL_CALLS]"):
        found = _MISTRAL_CALL.fullmatch(piece)
        if found is None:
            raise ValueError(text)
        calls.append(_call(found[1], json.loads(found[2])))
    return calls


Format = Tagged | Leading
FORMATS: dict[str, Format] = {
    "hermes": Tagged(),
    "llama3_json": Leading("{", _json_objects, marker="<|python_tag|>"),
    "pythonic": Leading("[", _python_calls),
    "mistral": Leading("[", _mistral_calls, marker="[TOOL_CALLS]", special_tokens=True),
}
