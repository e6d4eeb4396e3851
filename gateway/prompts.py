"""Turns a request into prompt token ids with the model's own tokenizer and chat template, so the gateway can
count tokens and check the context before anything is queued. The gateway loads tokenizers, never weights."""

from __future__ import annotations

import json
import threading
from functools import cached_property
from pathlib import Path

from jinja2 import TemplateError
from llguidance import LLTokenizer
from tokenizers import Tokenizer
from transformers.utils.chat_template_utils import render_jinja_template

from gateway.errors import APIError
from gateway.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, TemplateOptions, TokenizeRequest
from shared.settings import Settings

SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
"""What a model's generation_config.json may set for requests that do not (as vLLM's --generation-config auto)."""


class PromptTokenizer:
    """A prepared model's tokenizer.json and chat template, read with the `tokenizers` library and rendered by
    transformers' own template function: the ids AutoTokenizer gives, without the torch that `transformers`'
    tokenizer classes import (a gateway holding AutoTokenizer took ~1 GB, with this ~0.1 GB). And its sampling
    defaults."""

    def __init__(self, path: Path, chat_template: str | None = None):
        """`chat_template` (ModelSpec.chat_template) replaces the model's own."""
        generation = path / "generation_config.json"
        generation = json.loads(generation.read_text()) if generation.is_file() else {}
        self.sampling_defaults = {k: generation[k] for k in SAMPLING_DEFAULTS if generation.get(k) is not None}
        config = json.loads((path / "tokenizer_config.json").read_text())
        self._tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        template = path / "chat_template.jinja"
        self._template = template.read_text() if template.is_file() else config.get("chat_template")
        if chat_template is not None:
            self._template = _template_text(chat_template)
        self._special_tokens = {
            key: value["content"] if isinstance(value, dict) else value
            for key, value in config.items()
            if key.endswith("_token") and isinstance(value, str | dict)
        }
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(i for i, t in self._tokenizer.get_added_tokens_decoder().items() if t.special)
        eos = self._special_tokens.get("eos_token")
        self.eos_id: int | None = self._tokenizer.token_to_id(eos) if eos else None

    def chat_ids(
        self, messages: list[dict], tools: list[dict] | None = None, options: TemplateOptions | None = None
    ) -> list[int]:
        if not isinstance(self._template, str):
            raise APIError(400, "This model has no chat template: send its prompt to /v1/completions.")
        options = options or TemplateOptions()
        try:
            (text,), _ = render_jinja_template(
                [messages], tools=tools, chat_template=self._template,
                add_generation_prompt=options.add_generation_prompt,
                continue_final_message=options.continue_final_message,
                **{**self._special_tokens, **(options.chat_template_kwargs or {})},
            )  # fmt: skip
        except (TemplateError, ValueError) as error:
            # A template's raise_exception() (e.g. on roles it does not take), or a final message it does not show.
            raise APIError(400, f"The model's chat template refused the messages: {error}", param="messages") from None
        return self.encode(text, special_tokens=False)

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    @cached_property
    def grammar_tokenizer(self) -> LLTokenizer:
        """The vocabulary that structured-output grammars are checked against (~0.2 s and ~30 MB, at first use)."""
        return LLTokenizer(self._tokenizer.to_str())


def _template_text(given: str) -> str:
    """A template given as a file's path, or as itself (as vLLM's --chat-template takes it)."""
    if Path(given).is_file():
        return Path(given).read_text()
    if "{{" in given or "{%" in given:
        return given
    raise ValueError(f"chat_template is neither a readable file nor a Jinja template: {given!r}")


class Tokenizers:
    def __init__(self, settings: Settings):
        self._settings = settings
        self._loaded: dict[str, PromptTokenizer] = {}
        self._lock = threading.Lock()

    def get(self, model: str) -> PromptTokenizer:
        tokenizer = self._loaded.get(model)
        if tokenizer is not None:
            return tokenizer
        with self._lock:
            if model not in self._loaded:
                if not self._prepared(model):
                    raise APIError(503, f"Model '{model}' is not prepared yet.", code="model_not_ready")
                spec = self._settings.models[model]
                self._loaded[model] = PromptTokenizer(self._settings.model_dir(model), spec.chat_template)
            return self._loaded[model]

    def load_prepared(self) -> None:
        """Loads the tokenizer of every model already prepared, so that no request (or batch run) pays for it."""
        for model in self._settings.models:
            if self._prepared(model):
                self.get(model)

    def _prepared(self, model: str) -> bool:
        return (self._settings.model_dir(model) / "tokenizer_config.json").is_file()


def chat_token_ids(tokenizer: PromptTokenizer, request: ChatCompletionRequest | TokenizeRequest) -> list[int]:
    tools = getattr(request, "tools", None)
    return tokenizer.chat_ids(
        [_template_message(m) for m in request.messages], [t.model_dump() for t in tools] if tools else None, request
    )


def _template_message(message: ChatMessage) -> dict:
    """A message as chat templates take it: tool calls' arguments as objects, as transformers' templates expect."""
    rendered = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
    if message.tool_calls:
        rendered["tool_calls"] = [
            {
                "id": c.id,
                "type": c.type,
                "function": {"name": c.function.name, "arguments": _object(c.function.arguments)},
            }
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    if message.reasoning is not None:
        rendered["reasoning_content"] = message.reasoning
    return rendered


def _object(arguments: str) -> dict | str:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def check_token_ids(tokenizer: PromptTokenizer, ids, param: str) -> None:
    if ids and max(ids) >= tokenizer.vocab_size:
        raise APIError(
            400, f"A token id in '{param}' is out of the vocabulary range.", param=param, code="invalid_value"
        )


def completion_token_ids(tokenizer: PromptTokenizer, request: CompletionRequest) -> list[int]:
    """The ids of the request's (first) prompt: a request of several prompts is built one prompt at a time."""
    prompt = request.prompts[0]
    if isinstance(prompt, list):
        check_token_ids(tokenizer, prompt, "prompt")
        return list(prompt)
    if not prompt:
        raise APIError(400, "The prompt is empty.", param="prompt", code="invalid_value")
    return tokenizer.encode(prompt)


def truncated(ids: list[int], keep: int | None, requested: int | None, context: int, settings: Settings) -> list[int]:
    """vLLM's truncate_prompt_tokens: the prompt's last `keep` tokens; -1: as many as fit in the context beside the
    output (max_tokens, or the default)."""
    if keep == -1:
        keep = context - min(requested or settings.default_max_tokens, context - 1)
    return ids if keep is None else ids[-keep:]


def bad_words_token_ids(tokenizer: PromptTokenizer, words: list[str]) -> list[list[int]]:
    """vLLM's bad_words as token sequences: each word alone (at the start of the output) and after a space (in
    mid-text; vLLM keeps that form only when it has as many tokens, so " Paris" would stay allowed where "Paris"
    is two tokens)."""
    found = []
    for word in words:
        alone = tokenizer.encode(word.lstrip(), special_tokens=False)
        if not alone:
            continue
        found.append(alone)
        spaced = tokenizer.encode(" " + word.lstrip(), special_tokens=False)
        if spaced != alone:
            found.append(spaced)
    return found


def output_budget(prompt_tokens: int, requested: int | None, context: int, settings: Settings) -> int:
    """max_tokens to run with, or a 400 when the prompt (plus the requested output) does not fit the context."""
    if requested is not None and requested > settings.max_output_tokens:
        raise APIError(
            400,
            f"max_tokens is too large: {requested}. This server allows at most {settings.max_output_tokens}.",
            param="max_tokens",
            code="invalid_value",
        )
    if prompt_tokens + (requested or 1) > context:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + (requested or 0)} tokens ({prompt_tokens} in the messages, {requested or 0} in the "
            "completion). Please reduce the length of the messages or completion.",
            param="messages",
            code="context_length_exceeded",
        )
    return requested if requested is not None else min(settings.default_max_tokens, context - prompt_tokens)
