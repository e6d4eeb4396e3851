"""The logic of the OpenAI endpoints: a request body becomes an InferenceRequest on the queue, and what the
worker writes back becomes an OpenAI response, whole or as server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Literal

import structlog
from fastapi import Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from gateway.api_keys import ApiKey
from gateway.conversations import HEADER as CONVERSATION_HEADER
from gateway.conversations import conversation_key
from gateway.errors import APIError
from gateway.logprobs import LogprobsFormat
from gateway.prompts import Tokenizers, chat_token_ids, check_token_ids, completion_token_ids, output_budget
from gateway.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from gateway.queue_client import QueueClient
from gateway.rate_limits import Admission, RateLimiter
from gateway.sanitize import DenyList
from shared.protocol import FinalResult, InferenceRequest, SamplingParams, TokenDelta, new_request_id
from shared.settings import Settings

log = structlog.get_logger(__name__)

Kind = Literal["chat", "text"]

_FAILURE_STATUS = {"expired": 504, "cancelled": 499, "error": 500}


def usage(final: FinalResult) -> dict:
    return {
        "prompt_tokens": final.prompt_tokens,
        "completion_tokens": final.completion_tokens,
        "total_tokens": final.prompt_tokens + final.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": final.cached_tokens},
    }


def failure(final: FinalResult) -> APIError:
    return APIError(
        _FAILURE_STATUS.get(final.finish_reason, 500),
        f"Request {final.finish_reason}: {final.error or 'no reason given'}.",
        code=f"request_{final.finish_reason}",
    )


TIMEOUT_HEADER = "x-request-timeout"


def requested_timeout_s(value: str | None, limit_s: float) -> float:
    """Seconds the request may take from now: the client's `X-Request-Timeout` when it is shorter than the
    configured limit. A request whose queue is estimated to outlast it is refused at once, not left to expire."""
    if value is None:
        return limit_s
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise APIError(
            400, f"Header '{TIMEOUT_HEADER}' must be a positive number of seconds.", param=TIMEOUT_HEADER,
            code="invalid_value",
        )  # fmt: skip
    return min(seconds, limit_s)


class Completions:
    def __init__(
        self, settings: Settings, queue: QueueClient, tokenizers: Tokenizers, limiter: RateLimiter | None = None
    ):
        """Without a limiter no per-key limits apply: the arq batch runner, bounded by jobs.batch_in_flight instead."""
        self.settings = settings
        self.queue = queue
        self.tokenizers = tokenizers
        self.limiter = limiter
        self.deny_list = DenyList(settings.protection.deny_patterns)

    def model_or_404(self, model: str):
        spec = self.settings.models.get(model)
        if spec is None:
            raise APIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")
        return spec

    def tokenize(self, body: TokenizeRequest) -> dict:
        spec = self.model_or_404(body.model)
        tokenizer = self.tokenizers.get(body.model)
        if body.messages is not None:
            ids = chat_token_ids(tokenizer, body)
        else:
            ids = tokenizer.encode(body.prompt, special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": spec.max_context, "tokens": ids}

    def detokenize(self, body: DetokenizeRequest) -> dict:
        self.model_or_404(body.model)
        tokenizer = self.tokenizers.get(body.model)
        check_token_ids(tokenizer, body.tokens, "tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    def build(
        self, kind: Kind, body: ChatCompletionRequest | CompletionRequest, headers: Mapping[str, str] | None = None
    ) -> InferenceRequest:
        """`headers` may carry the conversation id and a timeout shorter than the configured one (TIMEOUT_HEADER)."""
        headers = headers or {}
        spec = self.model_or_404(body.model)
        tokenizer = self.tokenizers.get(body.model)
        ids = chat_token_ids(tokenizer, body) if kind == "chat" else completion_token_ids(tokenizer, body)
        check_token_ids(tokenizer, body.logit_bias, "logit_bias")
        if self.deny_list.patterns:
            self.deny_list.check(_prompt_texts(body, tokenizer, ids))
        max_tokens = output_budget(len(ids), body.requested_max_tokens, spec.max_context, self.settings)
        now = time.time()
        return InferenceRequest(
            id=new_request_id(),
            model=body.model,
            prompt_token_ids=ids,
            sampling=SamplingParams(
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                repetition_penalty=body.repetition_penalty,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                logit_bias=body.logit_bias or {},
                seed=body.seed,
                stop=body.stop_list(),
                ignore_eos=body.ignore_eos,
                logprobs=body.logprobs_count,
            ),
            stream=body.stream,
            created=now,
            deadline=now + requested_timeout_s(headers.get(TIMEOUT_HEADER), self.settings.request_timeout_s),
            conversation=conversation_key(body, headers.get(CONVERSATION_HEADER)),
        )

    async def enqueue(self, request: InferenceRequest, key: ApiKey | None, followed: bool = True) -> Admission | None:
        """Admit `request` against its key's limits (none in open mode), then queue it; a refusal raises.

        A `followed` request (a connection relays it) holds a concurrency slot and is charged its output as it is
        relayed. One nobody follows (a job) holds no slot and is charged its prompt plus `max_tokens` up front, as
        OpenAI counts it, since no gateway sees its tokens go by."""
        admission = None
        cost = len(request.prompt_token_ids) + (0 if followed else request.sampling.max_tokens)
        if key is not None and self.limiter is not None:
            admission = await self.limiter.admit(key, request.id, cost, hold_slot=followed)
        try:
            await self.queue.submit(request)
        except BaseException:
            if admission is not None:
                await asyncio.shield(admission.refund(cost))
            raise
        return admission

    async def create(self, kind: Kind, body: ChatCompletionRequest | CompletionRequest, http: Request):
        http.state.model_name = body.model  # a label of llmfleet:requests_total (gateway.metrics)
        request = self.build(kind, body, http.headers)
        key: ApiKey | None = getattr(http.state, "api_key", None)
        structlog.contextvars.bind_contextvars(request_id=request.id)
        admission = await self.enqueue(request, key)
        # Never the prompt at INFO; `user` is often an e-mail address, which the log processor masks.
        log.info(
            "request.accepted",
            key_name=key.name if key else None,
            user=body.user,
            prompt_tokens=len(request.prompt_token_ids),
            max_tokens=request.sampling.max_tokens,
            stream=body.stream,
        )
        headers = {"x-request-id": request.id, **(admission.headers if admission else {})}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventSourceResponse(
                self._events(kind, request, include_usage, admission),
                headers=headers,
                ping=15,
                # A gateway told to stop lets open streams finish for this long before it cuts them.
                shutdown_grace_period=self.settings.delivery.drain_grace_s,
            )
        final = None
        try:
            final = await self._final_unless_disconnected(request, http)
        finally:
            await asyncio.shield(_settle(admission, final.completion_tokens if final else 0))
        if final.finish_reason not in ("stop", "length"):
            raise failure(final)
        return JSONResponse(whole_response(kind, request, final), headers=headers)

    async def _final_unless_disconnected(self, request: InferenceRequest, http: Request) -> FinalResult:
        async def final() -> FinalResult:
            async for event in self.queue.follow(request):
                if isinstance(event, FinalResult):
                    return event
            raise AssertionError("follow() always ends with a final record")

        async def disconnected() -> None:
            # Raced against the ASGI disconnect event, as vLLM does: polling is_disconnected() breaks under
            # middleware that consumes the receive channel.
            while (await http.receive())["type"] != "http.disconnect":
                pass

        waiting = asyncio.ensure_future(final())
        watching = asyncio.ensure_future(disconnected())
        done, _ = await asyncio.wait({waiting, watching}, return_when=asyncio.FIRST_COMPLETED)
        watching.cancel()
        if waiting in done:
            return waiting.result()
        waiting.cancel()
        await self.queue.cancel(request.id)
        log.info("request.client_disconnected")
        raise APIError(499, "Client closed the request.", code="client_disconnected")

    async def _events(
        self, kind: Kind, request: InferenceRequest, include_usage: bool, admission: Admission | None
    ) -> AsyncIterator[dict]:
        finished = False
        generated = 0
        logprobs = LogprobsFormat(kind) if request.sampling.logprobs is not None else None
        try:
            yield {"data": json.dumps(_chunk(kind, request, "", None, first=True))}
            async for event in self.queue.follow(request):
                generated = event.completion_tokens
                if isinstance(event, TokenDelta):
                    if admission is not None:
                        await admission.charge_output(generated)
                    if event.text or event.logprobs:
                        shown = logprobs.format(event.logprobs) if logprobs else None
                        yield {"data": json.dumps(_chunk(kind, request, event.text, None, logprobs=shown))}
                    continue
                finished = True
                if event.finish_reason not in ("stop", "length"):
                    yield {"data": json.dumps(failure(event).body())}
                    return
                yield {"data": json.dumps(_chunk(kind, request, "", event.finish_reason))}
                if include_usage:
                    yield {"data": json.dumps(_usage_chunk(kind, request, event))}
                yield {"data": "[DONE]"}
        finally:
            # One shielded step: a second cancellation would otherwise stop the cleanup halfway.
            await asyncio.shield(self._end_stream(request, finished, admission, generated))

    async def _end_stream(
        self, request: InferenceRequest, finished: bool, admission: Admission | None, generated: int
    ) -> None:
        if not finished:
            # The client went away (or we are shutting down): free the worker's slot.
            await self.queue.cancel(request.id)
            log.info("request.stream_closed_early")
        await _settle(admission, generated)


async def _settle(admission: Admission | None, completion_tokens: int) -> None:
    """Charge a finished request's remaining output tokens to its key and free its concurrency slot."""
    if admission is not None:
        await admission.charge_output(completion_tokens, final=True)
        await admission.release()


def _prompt_texts(body: ChatCompletionRequest | CompletionRequest, tokenizer, ids: list[int]) -> list[str]:
    """What the deny-list is matched against: the messages, the prompt, or the prompt token ids decoded."""
    if isinstance(body, ChatCompletionRequest):
        return [m.text() for m in body.messages]
    if isinstance(body.prompt, list) and isinstance(body.prompt[0], int):
        return [tokenizer.decode(ids)]
    return [body.prompt if isinstance(body.prompt, str) else body.prompt[0]]


def _ids(kind: Kind, request: InferenceRequest) -> dict:
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return {"id": f"{prefix}-{request.id}", "created": int(request.created), "model": request.model}


def _chunk(
    kind: Kind,
    request: InferenceRequest,
    text: str,
    finish_reason: str | None,
    first: bool = False,
    logprobs: dict | None = None,
) -> dict:
    if kind == "chat":
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**_ids(kind, request), "object": "chat.completion.chunk", "choices": [choice]}
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return {**_ids(kind, request), "object": "text_completion", "choices": [choice]}


def _usage_chunk(kind: Kind, request: InferenceRequest, final: FinalResult) -> dict:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {**_ids(kind, request), "object": obj, "choices": [], "usage": usage(final)}


def whole_response(kind: Kind, request: InferenceRequest, final: FinalResult) -> dict:
    logprobs = None if final.logprobs is None else LogprobsFormat(kind).format(final.logprobs)
    if kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": final.text},
            "logprobs": logprobs,
            "finish_reason": final.finish_reason,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": final.text, "logprobs": logprobs, "finish_reason": final.finish_reason}
        obj = "text_completion"
    return {**_ids(kind, request), "object": obj, "choices": [choice], "usage": usage(final)}
