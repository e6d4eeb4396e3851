"""Text Generation Inference's own API (POST /generate, /generate_stream, and / choosing by `stream`), so code
written against TGI (huggingface_hub's `InferenceClient.text_generation`, TGI's Python client) keeps working: the
request becomes a completions request of the first served model, and its result TGI's response, token events and
error bodies ({"error", "error_type"}, validation errors 422 as TGI answers them)."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import Field, ValidationError

from gateway.errors import APIError, failure
from gateway.prompts import PromptTokenizer
from gateway.protocol import MAX_LOGPROBS, MAX_STOP_SEQUENCES, CompletionRequest, Text, _Strict
from shared.protocol import FinalResult, TokenDelta, TokenLogprob
from shared.settings import Settings


class Grammar(_Strict):
    type: Literal["json", "regex", "json_object"]
    value: dict | str | None = None


class GenerateParameters(_Strict):
    max_new_tokens: Annotated[int, Field(ge=1, le=2**31)] | None = None
    do_sample: bool = False
    """Greedy unless true, or unless a sampling parameter (temperature, top_k, top_p, typical_p) is given."""
    temperature: Annotated[float, Field(gt=0.0, le=2.0)] | None = None
    top_k: Annotated[int, Field(ge=1, le=100_000)] | None = None
    top_p: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    stop: Annotated[
        list[Annotated[Text, Field(min_length=1, max_length=256)]], Field(max_length=MAX_STOP_SEQUENCES)
    ] = []
    return_full_text: bool | None = None
    """The input before the generated text."""
    details: bool = False
    decoder_input_details: bool = False
    """With details: every input token's log probability (the first's null)."""
    top_n_tokens: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    truncate: Annotated[int, Field(ge=1)] | None = None
    """Only the input's last this many tokens."""
    grammar: Grammar | None = None
    best_of: Literal[1] | None = None
    watermark: Literal[False] = False
    typical_p: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    adapter_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    """One of the model's LoRA adapters (models.NAME.lora_modules)."""


class GenerateRequest(_Strict):
    inputs: Annotated[Text, Field(min_length=1)]
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


def parse(body: object) -> GenerateRequest:
    try:
        return GenerateRequest.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise APIError(400, f"Input validation error: {where}: {first['msg']}", param=where or None) from None


def info(settings: Settings, version: str) -> dict:
    """GET /info: what TGI says of the model it serves (the first configured)."""
    model, spec = next(iter(settings.models.items()))
    return {
        "model_id": model,
        "max_input_tokens": spec.max_context - 1,
        "max_total_tokens": spec.max_context,
        "max_best_of": 1,
        "max_stop_sequences": MAX_STOP_SEQUENCES,
        "max_concurrent_requests": spec.max_queue_depth,
        "router": "llmfleet",
        "version": version,
    }


def error_response(error: APIError) -> JSONResponse:
    """TGI's error body; its status for a request it refuses is 422."""
    status = 422 if error.status == 400 else error.status
    kind = {422: "validation", 429: "overloaded", 503: "unavailable"}.get(status, "generation")
    return JSONResponse({"error": error.message, "error_type": kind}, status_code=status, headers=error.headers)


def completion_request(body: GenerateRequest, model: str, stream: bool) -> CompletionRequest:
    """The completions request that answers `body` (streamed or not, as the route says)."""
    p = body.parameters
    if stream and p.decoder_input_details:
        raise APIError(400, "Input validation error: `decoder_input_details` == true is not supported when streaming")
    sampled = p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p))
    scored = p.details or stream  # TGI's tokens come with their log probabilities
    fields = {
        "model": p.adapter_id or model,
        "prompt": body.inputs,
        "truncate_prompt_tokens": p.truncate,
        "max_tokens": p.max_new_tokens,
        "temperature": (p.temperature or 1.0) if sampled else 0.0,
        "top_k": p.top_k,
        "top_p": p.top_p,
        "typical_p": p.typical_p,
        "repetition_penalty": p.repetition_penalty,
        "frequency_penalty": p.frequency_penalty,
        "seed": p.seed,
        "stop": p.stop or None,
        "stream": stream,
        "logprobs": (p.top_n_tokens or 0) if scored else None,
        "echo": (p.details and p.decoder_input_details) or None,
        "structured_outputs": _structured(p.grammar) if p.grammar else None,
    }
    try:
        return CompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as error:
        raise APIError(400, f"Input validation error: {error.errors()[0]['msg']}") from None


def _structured(grammar: Grammar) -> dict:
    if grammar.type == "json_object":
        return {"json_object": True}
    if grammar.value is None:
        raise APIError(400, f"Input validation error: a '{grammar.type}' grammar needs a value", param="grammar")
    return {"json": grammar.value} if grammar.type == "json" else {"regex": grammar.value}


def _finish_reason(final: FinalResult) -> str:
    if final.finish_reason == "length":
        return "length"
    return "eos_token" if final.stop_reason is None else "stop_sequence"


class Responder:
    """A request's TGI response, whole, or as token events (each sent one event late, so that the last one can
    carry the generated text and the details, as TGI's last event does)."""

    def __init__(self, body: GenerateRequest, tokenizer: PromptTokenizer):
        self.body = body
        self.tokenizer = tokenizer
        self._held: dict | None = None

    def _token(self, token_id: int | None, text: str, logprob: float | None) -> dict:
        return {"id": token_id, "text": text, "logprob": logprob, "special": token_id in self.tokenizer.special_ids}

    def _top(self, logprob: TokenLogprob) -> list[dict]:
        return [self._token(i, t, v) for i, (t, v) in zip(logprob.top_ids, logprob.top)]

    def _text(self, final: FinalResult) -> str:
        full = self.body.parameters.return_full_text
        return self.body.inputs + final.text if full else final.text

    def _details(self, final: FinalResult, with_tokens: bool) -> dict:
        p = self.body.parameters
        details = {"finish_reason": _finish_reason(final), "generated_tokens": final.completion_tokens, "seed": p.seed}
        if not with_tokens:
            return details
        logprobs = final.logprobs or []
        details["tokens"] = [self._token(lp.token_id, lp.token, lp.logprob) for lp in logprobs]
        details["top_tokens"] = [self._top(lp) for lp in logprobs] if p.top_n_tokens else None
        prompt = final.prompt_logprobs or []
        details["prefill"] = [{"id": lp.token_id, "text": lp.token, "logprob": lp.logprob} for lp in prompt]
        details["best_of_sequences"] = None
        return details

    def whole(self, final: FinalResult) -> dict:
        response: dict = {"generated_text": self._text(final)}
        if self.body.parameters.details:
            response["details"] = self._details(final, with_tokens=True)
        return response

    def event(self, delta: TokenDelta) -> dict | None:
        """The event to send now, if any: the one held back before this delta's."""
        if not delta.token_ids:  # text held back for a stop string, released: it belongs to the last token
            if self._held is not None:
                self._held["token"]["text"] += delta.text
            return None
        logprob = delta.logprobs[0] if delta.logprobs else None
        ready, self._held = (
            self._held,
            self._new_event(delta.completion_tokens, delta.token_ids[0], delta.text, logprob),
        )
        return {"data": json.dumps(ready)} if ready is not None else None

    def _new_event(self, index: int, token_id: int | None, text: str, logprob: TokenLogprob | None) -> dict:
        top = [self._top(logprob)] if logprob is not None and self.body.parameters.top_n_tokens else None
        token = self._token(token_id, text, logprob.logprob if logprob else None)
        return {"index": index, "token": token, "top_tokens": top, "generated_text": None, "details": None}

    def last(self, final: FinalResult) -> dict:
        """The last event: the held one (or, where the end-of-sequence token ended it, that token), with the
        generated text and, with `details`, the details."""
        if not final.completed:
            return {"data": json.dumps({"error": failure(final).message, "error_type": "generation"})}
        event = self._held or self._new_event(final.completion_tokens + 1, self.tokenizer.eos_id, "", None)
        event["generated_text"] = self._text(final)
        if self.body.parameters.details:
            event["details"] = self._details(final, with_tokens=False)
        return {"data": json.dumps(event)}
