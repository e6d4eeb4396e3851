"""The bodies of OpenAI's chat and completions responses: whole, as streamed chunks, and their usage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gateway import tool_calls
from gateway.logprobs import LogprobsFormat, prompt_entries
from shared.protocol import FinalResult, InferenceRequest

Kind = Literal["chat", "text"]


def usage(requests: list[InferenceRequest], finals: list[FinalResult]) -> dict:
    """Of a request's choices (`finals`, in the order of `requests`): each prompt counted once, as OpenAI counts it
    (by its first choice), the outputs summed."""
    firsts = [f for r, f in zip(requests, finals) if r.choice_of is None]
    counts = token_counts(sum(f.prompt_tokens for f in firsts), sum(f.completion_tokens for f in finals))
    return {**counts, "prompt_tokens_details": {"cached_tokens": sum(f.cached_tokens for f in firsts)}}


def token_counts(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _ids(kind: Kind, request: InferenceRequest) -> dict:
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return {"id": f"{prefix}-{request.id}", "created": int(request.created), "model": request.adapter or request.model}


@dataclass
class TokenIds:
    """vLLM's return_token_ids, for one choice's chunk or whole response."""

    output: list[int]
    prompt: list[int] | None = None
    """The prompt's ids, given once."""


def _with_token_ids(kind: Kind, body: dict, choice: dict, ids: TokenIds | None) -> dict:
    """vLLM's return_token_ids: the output's ids in the choice, the prompt's in the choice (completions) or the body
    (chat)."""
    if ids is not None:
        choice["token_ids"] = ids.output
        if ids.prompt is not None:
            (body if kind == "chat" else choice)["prompt_token_ids"] = ids.prompt
    return body


def chunk(
    kind: Kind,
    request: InferenceRequest,
    text: str,
    finish_reason: str | None,
    first: bool = False,
    logprobs: dict | None = None,
    index: int = 0,
    delta: dict | None = None,
    stop_reason: str | int | None = None,
    ids: TokenIds | None = None,
) -> dict:
    """One choice's chunk; the one that ends it also carries vLLM's `stop_reason`."""
    ended = {"stop_reason": stop_reason} if finish_reason is not None else {}
    if kind == "chat":
        if delta is None:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason, **ended}
        body = {**_ids(kind, request), "object": "chat.completion.chunk", "choices": [choice]}
    else:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason, **ended}
        body = {**_ids(kind, request), "object": "text_completion", "choices": [choice]}
    return _with_token_ids(kind, body, choice, ids)


def usage_chunk(kind: Kind, requests: list[InferenceRequest], finals: list[FinalResult]) -> dict:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {**_ids(kind, requests[0]), "object": obj, "choices": [], "usage": usage(requests, finals)}


def whole_response(kind: Kind, requests: list[InferenceRequest], finals: list[FinalResult]) -> dict:
    """The response to a request whose choices (`requests`, as enqueue returns them) ended with `finals`. A prompt's
    log probabilities, computed by its first choice, go before an echo's output log probabilities and, in vLLM's
    shape, into `prompt_logprobs` (each choice's in completions, the response's in chat)."""
    choices = []
    scored: list = []
    for index, (request, final) in enumerate(zip(requests, finals)):
        if request.choice_of is None:
            scored = final.prompt_logprobs
        echoed = scored if request.echo is not None and kind == "text" else []
        logprobs = None if final.logprobs is None else LogprobsFormat(kind).format((echoed or []) + final.logprobs)
        choice: dict = {"index": index}
        reason = final.finish_reason
        if kind == "chat":
            choice["message"], reason = tool_calls.message(request, final)
            if request.echo and choice["message"]["content"] is not None:
                choice["message"]["content"] = request.echo + choice["message"]["content"]
        else:
            choice["text"] = (request.echo or "") + final.text
            if scored is not None:
                choice["prompt_logprobs"] = prompt_entries(scored)
        choices.append({**choice, "logprobs": logprobs, "finish_reason": reason, "stop_reason": final.stop_reason})
    obj = "chat.completion" if kind == "chat" else "text_completion"
    response = {**_ids(kind, requests[0]), "object": obj, "choices": choices, "usage": usage(requests, finals)}
    if requests[0].return_token_ids:
        for choice, request, final in zip(choices, requests, finals):
            _with_token_ids(kind, response, choice, TokenIds(final.token_ids or [], request.prompt_token_ids))
    if kind == "chat" and scored is not None:
        response["prompt_logprobs"] = prompt_entries(scored)
    return response
