"""The logic of the OpenAI endpoints: a request body becomes an InferenceRequest on the queue, and what the
worker writes back becomes an OpenAI response, whole or as server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

import structlog
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sse_starlette import EventSourceResponse

from gateway import embeddings, reasoning, responses, tgi, tool_calls
from gateway.api_keys import ApiKey
from gateway.chat_deltas import ChoiceDeltas
from gateway.completion_shapes import Kind, TokenIds, chunk, token_counts, usage_chunk, whole_response
from gateway.conversations import HEADER as CONVERSATION_HEADER
from gateway.conversations import conversation_key
from gateway.errors import APIError, failure, first_failure, invalid_body
from gateway.logprobs import LogprobsFormat
from gateway.lora_adapters import RuntimeAdapters
from gateway.prompts import (
    SAMPLING_DEFAULTS,
    Tokenizers,
    bad_words_token_ids,
    chat_token_ids,
    check_token_ids,
    completion_token_ids,
    output_budget,
    truncated,
)
from gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    StreamOptions,
    TokenizeRequest,
)
from gateway.queue_client import QueueClient
from gateway.rate_limits import Admission, RateLimiter
from gateway.response_store import ResponseStore
from gateway.responses import ResponsesRequest
from gateway.sanitize import DenyList
from gateway.structured_output import after_thinking, output_grammar
from shared import tracing
from shared.protocol import (
    AdapterSource,
    FinalResult,
    InferenceRequest,
    SamplingParams,
    TokenDelta,
    TokenLogprob,
    new_request_id,
)
from shared.settings import ModelSpec, Settings

log = structlog.get_logger(__name__)

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


@dataclass(frozen=True)
class Served:
    """What a request's `model` names: a configured model, and the LoRA adapter with it if it names one."""

    name: str
    spec: ModelSpec
    adapter: str | None = None
    source: AdapterSource | None = None
    """A runtime adapter's (gateway.lora_adapters); None for a configured one."""

    @classmethod
    def runtime(cls, settings: Settings, name: str, source: AdapterSource) -> Served:
        return cls(source.model, settings.models[source.model], name, source)


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
        self.stored = ResponseStore(queue.redis, settings.stored_response_ttl_s)
        self.runtime_adapters = RuntimeAdapters(settings, queue)

    async def served(self, model: str) -> Served:
        """What a request's `model` names: a model's name or alias, or an adapter's name (configured or loaded)."""
        name = self.settings.served_names().get(model)
        if name is not None:
            spec = self.settings.models[name]
            return Served(name, spec, model if model in spec.lora_modules else None)
        source = await self.runtime_adapters.source(model)
        if source is None:
            raise APIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")
        return Served.runtime(self.settings, model, source)

    async def tokenize(self, body: TokenizeRequest) -> dict:
        served = await self.served(body.model)
        tokenizer = self.tokenizers.get(served.name)
        if body.messages is not None:
            ids = chat_token_ids(tokenizer, body)
        else:
            ids = tokenizer.encode(body.prompt, special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": served.spec.max_context, "tokens": ids}

    async def detokenize(self, body: DetokenizeRequest) -> dict:
        tokenizer = self.tokenizers.get((await self.served(body.model)).name)
        check_token_ids(tokenizer, body.tokens, "tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    def build(
        self,
        kind: Kind,
        body: ChatCompletionRequest | CompletionRequest,
        served: Served,
        headers: Mapping[str, str] | None = None,
    ) -> InferenceRequest:
        """`headers` may carry the conversation id and a timeout shorter than the configured one (TIMEOUT_HEADER)."""
        headers = headers or {}
        name, spec = served.name, served.spec
        if body.priority and self.settings.scheduling_policy != "priority":
            raise APIError(
                400,
                f"'priority' {body.priority} needs scheduling_policy 'priority'; this fleet's is "
                f"'{self.settings.scheduling_policy}' (send 0 or leave it out).",
                param="priority",
                code="unsupported_value",
            )
        tokenizer = self.tokenizers.get(name)
        given = chat_token_ids(tokenizer, body) if kind == "chat" else completion_token_ids(tokenizer, body)
        for param in ("logit_bias", "stop_token_ids", "allowed_token_ids"):
            check_token_ids(tokenizer, getattr(body, param), param)
        if self.deny_list.patterns:
            self.deny_list.check(_prompt_texts(body, tokenizer, given))
        requested = body.requested_max_tokens
        ids = truncated(given, body.truncate_prompt_tokens, requested, spec.max_context, self.settings)
        max_tokens = output_budget(len(ids), requested, spec.max_context, self.settings)
        echo = _echo(kind, body, tokenizer, given, ids)
        prompt_logprobs = body.prompt_logprobs
        if prompt_logprobs is None and echo is not None and kind == "text":
            prompt_logprobs = body.logprobs_count  # as vLLM: a completion echo's log probabilities are the prompt's
        # The model's own sampling settings (generation_config.json) where the request gives none.
        defaults = tokenizer.sampling_defaults if spec.generation_config == "auto" else {}
        sampled = {
            f: defaults[f] if f in defaults and f not in body.model_fields_set else getattr(body, f)
            for f in SAMPLING_DEFAULTS
        }
        grammar = output_grammar(body, tokenizer)
        tool_call = tool_calls.tool_call_mode(body, spec.tool_call_parser) if kind == "chat" else None
        thinking = None
        if spec.reasoning_parser and kind == "chat":
            from_start = grammar is not None and spec.structured_outputs_in_reasoning
            thinking = reasoning.opening(tokenizer.decode(ids[-8:]), constrained=from_start)
            if grammar is not None and not from_start:
                grammar = after_thinking(grammar, thinking)
        now = time.time()
        return InferenceRequest(
            id=new_request_id(),
            model=name,
            prompt_token_ids=ids,
            sampling=SamplingParams(
                max_tokens=max_tokens,
                **sampled,
                typical_p=body.typical_p,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                logit_bias=body.logit_bias or {},
                seed=body.seed,
                stop=body.stop_list(),
                include_stop_str_in_output=body.include_stop_str_in_output,
                stop_token_ids=body.stop_token_ids or [],
                allowed_token_ids=sorted(set(body.allowed_token_ids)) if body.allowed_token_ids else None,
                bad_words_token_ids=bad_words_token_ids(tokenizer, body.bad_words or []),
                min_tokens=body.min_tokens,
                ignore_eos=body.ignore_eos,
                # As vLLM's mistral parser: the calls of its v11 tokenizer are special tokens and names.
                skip_special_tokens=body.skip_special_tokens and not tool_calls.keeps_special_tokens(tool_call),
                logprobs=body.logprobs_count,
                prompt_logprobs=prompt_logprobs,
                return_tokens_as_token_ids=body.return_tokens_as_token_ids,
                grammar=grammar,
            ),
            stream=body.stream,
            created=now,
            deadline=now + requested_timeout_s(headers.get(TIMEOUT_HEADER), self.settings.request_timeout_s),
            conversation=conversation_key(body, headers.get(CONVERSATION_HEADER)),
            echo=echo,
            tool_call=tool_call,
            reasoning=thinking,
            include_reasoning=body.include_reasoning if kind == "chat" else True,
            return_token_ids=body.return_token_ids,
            adapter=served.adapter,
            adapter_source=served.source,
            cache_salt=body.cache_salt,
            trace_headers=tracing.current_headers(),
            priority=body.priority or 0,
        )

    async def build_embeddings(
        self, body: embeddings.EmbeddingRequest, headers: Mapping[str, str] | None = None
    ) -> list[InferenceRequest]:
        """One request an input (`headers` may carry a timeout shorter than the configured one)."""
        served = await self.served(body.model)
        tokenizer = self.tokenizers.get(served.name)
        prompts = embeddings.prompt_ids(tokenizer, body, served.spec.max_context)
        if self.deny_list.patterns:
            self.deny_list.check([tokenizer.decode(ids) for ids in prompts])
        now = time.time()
        timeout_s = requested_timeout_s((headers or {}).get(TIMEOUT_HEADER), self.settings.request_timeout_s)
        return [
            InferenceRequest(
                id=new_request_id(), model=served.name, prompt_token_ids=ids, sampling=SamplingParams(max_tokens=0),
                stream=False, created=now, deadline=now + timeout_s, embed=True, adapter=served.adapter,
                adapter_source=served.source, trace_headers=tracing.current_headers(),
            )
            for ids in prompts
        ]  # fmt: skip

    async def build_all(
        self, kind: Kind, body: ChatCompletionRequest | CompletionRequest, headers: Mapping[str, str] | None = None
    ) -> list[InferenceRequest]:
        """One request a prompt (completions take several) and choice, each prompt's first, in the order of the
        response's choices."""
        served = await self.served(body.model)
        bodies = body.one_per_prompt() if isinstance(body, CompletionRequest) else [body]
        prompts = [self.build(kind, each, served, headers) for each in bodies]
        return [r for p in prompts for r in [p, *(_another_choice(p, i) for i in range(1, body.n))]]

    async def enqueue(
        self, requests: list[InferenceRequest], key: ApiKey | None, followed: bool = True
    ) -> Admission | None:
        """Admit a request (its prompts and choices, as build_all lays them out) against its key's limits (none
        in open mode), then queue them; a refusal raises, and unqueues what went before it.

        A `followed` request (a connection relays it) holds a concurrency slot and is charged its output as it is
        relayed. One nobody follows (a job) holds no slot and is charged its prompts plus `max_tokens` a choice up
        front, as OpenAI counts it, since no gateway sees its tokens go by. A prompt is charged once, whatever its
        choices."""
        admission = None
        prompt_tokens = sum(len(r.prompt_token_ids) for r in requests if r.choice_of is None)
        cost = prompt_tokens + (0 if followed else sum(r.sampling.max_tokens for r in requests))
        if key is not None and self.limiter is not None:
            admission = await self.limiter.admit(key, requests[0].id, cost, hold_slot=followed)
        queued = []
        try:
            for each in requests:
                await self.queue.submit(each)
                queued.append(each)
        except BaseException:
            await asyncio.shield(self._unqueue(queued, admission, cost))
            raise
        return admission

    async def _unqueue(self, queued: list[InferenceRequest], admission: Admission | None, cost: int) -> None:
        for request in queued:
            await self.queue.cancel(request.id)
        if admission is not None:
            await admission.refund(cost)

    async def create(self, kind: Kind, body: ChatCompletionRequest | CompletionRequest, http: Request):
        _, requests, admission, headers = await self._accept(kind, body, http)
        if body.stream:
            return self._streamed(
                self._events(kind, requests, body.stream_options or StreamOptions(), admission), headers
            )
        finals = await self._finals(requests, http, admission)
        return JSONResponse(whole_response(kind, requests, finals), headers=headers)

    async def embed(self, body: embeddings.EmbeddingRequest, http: Request):
        """POST /v1/embeddings: one request an input, each ending with its prefill."""
        requests = await self.build_embeddings(body, http.headers)
        admission, headers = await self._admit(requests, http, body.user)
        finals = await self._finals(requests, http, admission)
        return JSONResponse(embeddings.response(body.model, finals, body.encoding_format), headers=headers)

    async def respond(self, body: ResponsesRequest, http: Request):
        """POST /v1/responses: answered as the chat request it becomes (gateway.responses)."""
        owner = getattr(http.state, "key_id", None)
        earlier = await self.stored.conversation(body.previous_response_id, owner) if body.previous_response_id else []
        messages = responses.conversation(body, earlier)
        try:
            chat = responses.chat_request(body, messages)
            request, requests, admission, headers = await self._accept("chat", chat, http)
        except APIError as error:
            raise responses.in_its_terms(error) from None
        writer = responses.ResponseWriter(body, request)

        async def store(response: dict, final: FinalResult) -> None:
            if body.stored and response["status"] != "failed":
                answered = [*messages, tool_calls.message(request, final)[0]]
                await self.stored.save(response, answered, responses.input_items(body, response["id"]), owner)

        if chat.stream:
            return self._streamed(self._response_events(writer, requests, admission, store), headers)
        (final,) = await self._finals(requests, http, admission)
        response = writer.response(final)
        await store(response, final)
        return JSONResponse(response, headers=headers)

    async def generate(self, body: object, http: Request, stream: bool | None):
        """TGI's /generate (stream False), /generate_stream (True) and / (None: the body's `stream` says); errors in
        TGI's shape (gateway.tgi)."""
        try:
            parsed = tgi.parse(body)
            model = next(iter(self.settings.models))  # TGI serves one model: the first configured
            tokenizer = self.tokenizers.get(model)
            stream = parsed.stream if stream is None else stream
            completion = tgi.completion_request(parsed, model, stream)
            _, requests, admission, headers = await self._accept("text", completion, http)
            responder = tgi.Responder(parsed, tokenizer)
            if stream:
                return self._streamed(self._tgi_events(responder, requests, admission), headers)
            (final,) = await self._finals(requests, http, admission)
        except APIError as error:
            return tgi.error_response(error)
        return JSONResponse(responder.whole(final), headers=headers)

    async def invoke(self, body: object, http: Request):
        """SageMaker's POST /invocations (as vLLM and TGI serve it): the body's shape picks the API, chat's
        `messages`, a completion's `prompt` or TGI's `inputs`; without `model`, the first configured one."""
        if isinstance(body, dict) and "inputs" in body:
            return await self.generate(body, http, stream=None)
        if not isinstance(body, dict) or not {"messages", "prompt"} & body.keys():
            raise APIError(
                400, "The body must be a chat ('messages'), completion ('prompt') or TGI ('inputs') request.",
                code="invalid_value",
            )  # fmt: skip
        kind: Kind = "chat" if "messages" in body else "text"
        try:
            parsed = (ChatCompletionRequest if kind == "chat" else CompletionRequest).model_validate(
                {"model": next(iter(self.settings.models)), **body}
            )
        except ValidationError as error:
            raise invalid_body(error) from None
        return await self.create(kind, parsed, http)

    async def _accept(
        self, kind: Kind, body: ChatCompletionRequest | CompletionRequest, http: Request
    ) -> tuple[InferenceRequest, list[InferenceRequest], Admission | None, dict[str, str]]:
        """Build, admit and queue a request (one a prompt, and their other choices): the first, them all, the
        admission, the response's headers."""
        requests = await self.build_all(kind, body, http.headers)
        admission, headers = await self._admit(requests, http, body.user or getattr(body, "safety_identifier", None))
        return requests[0], requests, admission, headers

    async def _admit(
        self, requests: list[InferenceRequest], http: Request, user: str | None
    ) -> tuple[Admission | None, dict[str, str]]:
        """Admit and queue a request's parts (as build_all or build_embeddings lays them out), logged: the admission
        and the response's headers."""
        prompts = [r for r in requests if r.choice_of is None]
        request = requests[0]
        http.state.model_name = request.model  # a label of llmfleet:requests_total (gateway.metrics)
        key: ApiKey | None = getattr(http.state, "api_key", None)
        structlog.contextvars.bind_contextvars(request_id=request.id)
        admission = await self.enqueue(requests, key)
        # Never the prompt at INFO; `user` is often an e-mail address, which the log processor masks.
        log.info(
            "request.accepted",
            key_name=key.name if key else None,
            user=user,
            prompt_tokens=sum(len(p.prompt_token_ids) for p in prompts),
            max_tokens=request.sampling.max_tokens,
            prompts=len(prompts),
            choices=len(requests) // len(prompts),
            stream=request.stream,
        )
        return admission, {"x-request-id": request.id, **(admission.headers if admission else {})}

    def _streamed(self, events: AsyncIterator[dict], headers: dict[str, str]) -> EventSourceResponse:
        return EventSourceResponse(
            events,
            headers=headers,
            ping=15,
            # A gateway told to stop lets open streams finish for this long before it cuts them.
            shutdown_grace_period=self.settings.delivery.drain_grace_s,
        )

    async def _finals(
        self, requests: list[InferenceRequest], http: Request, admission: Admission | None
    ) -> list[FinalResult]:
        """The requests' final records, once all have ended well (else the first failure's error), the key charged."""
        finals: list[FinalResult] = []
        try:
            finals = await self._finals_unless_disconnected(requests, http)
        finally:
            await asyncio.shield(_settle(admission, sum(f.completion_tokens for f in finals)))
        if (failed := first_failure(finals)) is not None:
            raise failure(failed)
        return finals

    async def _follow(self, requests: list[InferenceRequest]) -> AsyncIterator[tuple[int, TokenDelta | FinalResult]]:
        """(choice index, event) of every request as they come, until each has ended."""
        if len(requests) == 1:
            async for event in self.queue.follow(requests[0]):
                yield 0, event
            return
        events: asyncio.Queue[tuple[int, TokenDelta | FinalResult | Exception]] = asyncio.Queue()

        async def pump(index: int, request: InferenceRequest) -> None:
            try:
                async for event in self.queue.follow(request):
                    await events.put((index, event))
            except Exception as error:  # raised where the events are read, not lost in a task nobody awaits
                await events.put((index, error))

        pumps = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(requests)]
        try:
            ended = 0
            while ended < len(requests):
                index, event = await events.get()
                if isinstance(event, Exception):
                    raise event
                ended += isinstance(event, FinalResult)
                yield index, event
        finally:
            for task in pumps:
                task.cancel()

    async def _finals_unless_disconnected(self, requests: list[InferenceRequest], http: Request) -> list[FinalResult]:
        async def finals() -> list[FinalResult]:
            ended: dict[int, FinalResult] = {}
            async for index, event in self._follow(requests):
                if isinstance(event, FinalResult):
                    ended[index] = event
            return [ended[i] for i in range(len(requests))]

        async def disconnected() -> None:
            # Raced against the ASGI disconnect event, as vLLM does: polling is_disconnected() breaks under
            # middleware that consumes the receive channel.
            while (await http.receive())["type"] != "http.disconnect":
                pass

        waiting = asyncio.ensure_future(finals())
        watching = asyncio.ensure_future(disconnected())
        done, _ = await asyncio.wait({waiting, watching}, return_when=asyncio.FIRST_COMPLETED)
        watching.cancel()
        if waiting in done:
            return waiting.result()
        waiting.cancel()
        for request in requests:
            await self.queue.cancel(request.id)
        log.info("request.client_disconnected")
        raise APIError(499, "Client closed the request.", code="client_disconnected")

    async def _events(
        self, kind: Kind, requests: list[InferenceRequest], options: StreamOptions, admission: Admission | None
    ) -> AsyncIterator[dict]:
        request = requests[0]
        ended: dict[int, FinalResult] = {}
        logprobs = [LogprobsFormat(kind) for _ in requests] if request.sampling.logprobs is not None else None
        prompt_tokens = sum(len(r.prompt_token_ids) for r in requests if r.choice_of is None)
        choices = [ChoiceDeltas(r) for r in requests] if kind == "chat" else None
        held_ids: list[list[int]] | None = [[] for _ in requests] if request.return_token_ids else None
        prompt_ids_sent: set[int] = set()

        def ids(index: int) -> TokenIds | None:
            """vLLM's return_token_ids: a chunk's output ids (held since the last chunk), the prompt's in the first."""
            if held_ids is None:
                return None
            taken, held_ids[index] = held_ids[index], []
            prompt = None if index in prompt_ids_sent else requests[index].prompt_token_ids
            prompt_ids_sent.add(index)
            return TokenIds(taken, prompt)

        async with _Relay(self, requests, admission) as relay:

            def data(body: dict) -> dict:
                if options.include_usage and options.continuous_usage_stats:
                    body["usage"] = token_counts(prompt_tokens, sum(relay.generated))
                return {"data": json.dumps(body)}

            # A completion's echo with log probabilities waits for its prompt's (computed in its prefill).
            scored_echo = kind == "text" and request.echo is not None and logprobs is not None
            events = _echo_first(requests, relay.events()) if scored_echo else relay.events()
            for index, each in enumerate(requests):
                if not scored_echo:
                    yield data(chunk(kind, request, each.echo or "", None, first=True, index=index, ids=ids(index)))
            async for index, event in events:
                if isinstance(event, ScoredPrompt):
                    shown = logprobs[index].format(event.logprobs)
                    echo = requests[index].echo
                    yield data(chunk(kind, request, echo, None, logprobs=shown, index=index, ids=ids(index)))
                    continue
                if isinstance(event, TokenDelta):
                    if held_ids is not None:
                        held_ids[index] += event.token_ids
                    delta = choices[index].feed(event.text) if choices else None
                    if (event.text or event.logprobs) and (choices is None or delta is not None):
                        shown = logprobs[index].format(event.logprobs) if logprobs else None
                        if delta != {} or shown:
                            shape = {"logprobs": shown, "index": index, "delta": delta, "ids": ids(index)}
                            yield data(chunk(kind, request, event.text, None, **shape))
                    continue
                ended[index] = event
                if not event.completed:
                    yield {"data": json.dumps(failure(event).body())}
                    return
                finish_reason = event.finish_reason
                if choices:
                    delta, finish_reason = choices[index].finish(event)
                    # A call the grammar wrote sends its tokens' log probabilities with it.
                    whole = logprobs and choices[index].whole
                    shown = logprobs[index].format(event.logprobs or []) if whole else None
                    if delta or shown:
                        yield data(
                            chunk(kind, request, "", None, logprobs=shown, index=index, delta=delta, ids=ids(index))
                        )
                ending = {"index": index, "stop_reason": event.stop_reason, "ids": ids(index)}
                yield data(chunk(kind, request, "", finish_reason, **ending))
            if options.include_usage:
                yield {"data": json.dumps(usage_chunk(kind, requests, [ended[i] for i in range(len(requests))]))}
            yield {"data": "[DONE]"}

    async def _response_events(
        self,
        writer: responses.ResponseWriter,
        requests: list[InferenceRequest],
        admission: Admission | None,
        store: Callable[[dict, FinalResult], Awaitable[None]],
    ) -> AsyncIterator[dict]:
        async with _Relay(self, requests, admission) as relay:
            for event in writer.opening():
                yield event
            async for _, event in relay.events():
                if isinstance(event, TokenDelta):
                    delta = writer.delta(event.text, event.logprobs) if event.text or event.logprobs else None
                    if delta is not None:
                        yield delta
                    continue
                await store(writer.response(event), event)
                for closing in writer.closing(event):
                    yield closing

    async def _tgi_events(
        self, responder: tgi.Responder, requests: list[InferenceRequest], admission: Admission | None
    ) -> AsyncIterator[dict]:
        async with _Relay(self, requests, admission) as relay:
            async for _, event in relay.events():
                ready = responder.event(event) if isinstance(event, TokenDelta) else responder.last(event)
                if ready is not None:
                    yield ready


@dataclass
class ScoredPrompt:
    """A choice's prompt log probabilities, ready for its streamed echo."""

    logprobs: list[TokenLogprob]


async def _echo_first(
    requests: list[InferenceRequest], events: AsyncIterator[tuple[int, TokenDelta | FinalResult]]
) -> AsyncIterator[tuple[int, TokenDelta | FinalResult | ScoredPrompt]]:
    """The choices' events, each choice's after a ScoredPrompt of its prompt's log probabilities, which come with the
    first delta (or the final) of the prompt's first choice: a choice's events wait for them. A failure before the
    prompt was scored goes out as it is."""
    prompt_of = [r.choice_of or r.id for r in requests]
    scores: dict[str, list[TokenLogprob]] = {}
    held: dict[int, list[TokenDelta | FinalResult]] = {}
    opened: set[int] = set()
    async for index, event in events:
        if event.prompt_logprobs:
            scores[prompt_of[index]] = event.prompt_logprobs
        held.setdefault(index, []).append(event)
        for waiting in list(held):
            scored = scores.get(prompt_of[waiting])
            failed = waiting == index and isinstance(event, FinalResult) and not event.completed
            if scored is None and not failed:
                continue
            if scored is not None and waiting not in opened:
                opened.add(waiting)
                yield waiting, ScoredPrompt(scored)
            for each in held.pop(waiting):
                yield waiting, each


class _Relay:
    """Follows a streamed request's choices: charges the key for the output as it goes and, when the stream ends
    (finished, failed, or the client gone), cancels the choices still running and settles the admission."""

    def __init__(self, completions: Completions, requests: list[InferenceRequest], admission: Admission | None):
        self.completions = completions
        self.requests = requests
        self.admission = admission
        self.ended: set[int] = set()
        self.generated = [0] * len(requests)

    async def events(self) -> AsyncIterator[tuple[int, TokenDelta | FinalResult]]:
        async for index, event in self.completions._follow(self.requests):
            self.generated[index] = event.completion_tokens
            if isinstance(event, FinalResult):
                self.ended.add(index)
            elif self.admission is not None:
                await self.admission.charge_output(sum(self.generated))
            yield index, event

    async def __aenter__(self) -> _Relay:
        return self

    async def __aexit__(self, *_) -> None:
        # One shielded step: a second cancellation would otherwise stop the cleanup halfway.
        await asyncio.shield(self._close([r for i, r in enumerate(self.requests) if i not in self.ended]))

    async def _close(self, unfinished: list[InferenceRequest]) -> None:
        if unfinished:
            # The client went away (or we are shutting down, or another choice failed): free the workers' slots.
            for request in unfinished:
                await self.completions.queue.cancel(request.id)
            log.info("request.stream_closed_early")
        await _settle(self.admission, sum(self.generated))


def _another_choice(request: InferenceRequest, index: int) -> InferenceRequest:
    """Choice `index` of a request for several: its own id, and with a seed, its own (seed + index)."""
    # The prompt's log probabilities come from the first choice, which computes its KV; the others copy it.
    sampling = request.sampling.model_copy(update={"prompt_logprobs": None})
    if sampling.seed is not None:
        sampling = sampling.model_copy(update={"seed": (sampling.seed + index) % 2**63})
    return request.model_copy(update={"id": new_request_id(), "sampling": sampling, "choice_of": request.id})


async def _settle(admission: Admission | None, completion_tokens: int) -> None:
    """Charge a finished request's remaining output tokens to its key and free its concurrency slot."""
    if admission is not None:
        await admission.charge_output(completion_tokens, final=True)
        await admission.release()


def _prompt_texts(body: ChatCompletionRequest | CompletionRequest, tokenizer, ids: list[int]) -> list[str]:
    """What the deny-list is matched against: the messages, the prompt, or the prompt token ids decoded."""
    if isinstance(body, ChatCompletionRequest):
        return [m.text() for m in body.messages]
    prompt = body.prompts[0]
    return [tokenizer.decode(ids) if isinstance(prompt, list) else prompt]


def _echo(kind: Kind, body: ChatCompletionRequest | CompletionRequest, tokenizer, given: list[int], ids: list[int]):
    """What `echo` puts before the output: completions' prompt (as sent, or what truncation left of it); chat's final
    assistant message, where one is continued (as vLLM echoes the last message when it has the answer's role)."""
    if not body.echo:
        return None
    if kind == "chat":
        last = body.messages[-1]
        return last.text() if last.role == "assistant" else None
    return _prompt_texts(body, tokenizer, given)[0] if ids == given else tokenizer.decode(ids)
