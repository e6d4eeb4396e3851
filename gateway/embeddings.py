"""OpenAI's embeddings (POST /v1/embeddings): each input's embedding is the served model's final norm output at its
last token, L2-normalised (last-token pooling, as Qwen3-Embedding, gte-Qwen2 and e5-mistral pool; vLLM's pooling
runner does so for a decoder-only model). The worker computes it in the input's prefill, which ends the request."""

from __future__ import annotations

import base64
import struct
from typing import Annotated, Literal

from pydantic import Field, model_validator

from gateway.errors import APIError
from gateway.prompts import PromptTokenizer, check_token_ids
from gateway.protocol import MAX_SEQUENCES, Text, TokenId, _Strict
from shared.protocol import FinalResult


class EmbeddingRequest(_Strict):
    model: str
    input: (
        Annotated[Text, Field(min_length=1)]
        | Annotated[list[Annotated[Text, Field(min_length=1)]], Field(min_length=1, max_length=MAX_SEQUENCES)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=MAX_SEQUENCES)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: Annotated[str, Field(max_length=256)] | None = None

    @model_validator(mode="after")
    def _no_dimensions(self):
        if self.dimensions is not None:
            raise APIError(
                400, "'dimensions' is not supported: the embedding has the model's hidden size.", param="dimensions",
                code="unsupported_value",
            )  # fmt: skip
        return self

    def inputs(self) -> list[str | list[int]]:
        given = self.input
        return [given] if isinstance(given, str) or isinstance(given[0], int) else list(given)


def prompt_ids(tokenizer: PromptTokenizer, body: EmbeddingRequest, context: int) -> list[list[int]]:
    """Each input's token ids (text with the tokenizer's special tokens, as the model's own tokenizer adds them)."""
    prompts = []
    for given in body.inputs():
        if isinstance(given, list):
            check_token_ids(tokenizer, given, "input")
        ids = list(given) if isinstance(given, list) else tokenizer.encode(given)
        if len(ids) >= context:
            raise APIError(
                400, f"This model's maximum context length is {context} tokens. However, an input has {len(ids)}.",
                param="input", code="context_length_exceeded",
            )  # fmt: skip
        prompts.append(ids)
    return prompts


def response(model: str, finals: list[FinalResult], encoding: str) -> dict:
    def encoded(vector: list[float]) -> list[float] | str:
        # OpenAI's base64: the float32 values' little-endian bytes.
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if encoding == "base64" else vector

    data = [{"object": "embedding", "index": i, "embedding": encoded(f.embedding)} for i, f in enumerate(finals)]
    tokens = sum(f.prompt_tokens for f in finals)
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
