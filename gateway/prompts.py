"""Turns a request into prompt token ids with the model's own tokenizer and chat template, so the gateway can
count tokens and check the context before anything is queued. The gateway loads tokenizers, never weights."""

from __future__ import annotations

import threading

from gateway.errors import APIError
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from shared.settings import Settings


class Tokenizers:
    def __init__(self, settings: Settings):
        self._settings = settings
        self._loaded: dict[str, object] = {}
        self._lock = threading.Lock()

    def get(self, model: str):
        tokenizer = self._loaded.get(model)
        if tokenizer is not None:
            return tokenizer
        with self._lock:
            if model not in self._loaded:
                from transformers import AutoTokenizer

                path = self._settings.model_dir(model)
                if not (path / "tokenizer_config.json").is_file():
                    raise APIError(503, f"Model '{model}' is not prepared yet.", code="model_not_ready")
                self._loaded[model] = AutoTokenizer.from_pretrained(path)
            return self._loaded[model]


def chat_token_ids(tokenizer, request: ChatCompletionRequest) -> list[int]:
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in request.messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def completion_token_ids(tokenizer, request: CompletionRequest) -> list[int]:
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        if max(prompt) >= len(tokenizer) or min(prompt) < 0:
            raise APIError(400, "Prompt token id out of the vocabulary range.", param="prompt", code="invalid_value")
        return list(prompt)
    text = prompt[0] if isinstance(prompt, list) else prompt
    if not text:
        raise APIError(400, "The prompt is empty.", param="prompt", code="invalid_value")
    return tokenizer(text)["input_ids"]


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
    return requested or min(settings.default_max_tokens, context - prompt_tokens)
