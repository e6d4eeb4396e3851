"""Messages the gateway and the workers exchange through Redis (see shared.keys for where each one lives)."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field

FinishReason = Literal["stop", "length", "cancelled", "expired", "error"]

HEARTBEAT_INTERVAL_S = 1.0
LIVE_WINDOW_S = 5.0
"""A worker whose last heartbeat is older than this is not live: gateways stop routing to it, and any other
worker may adopt what waits in its own stream."""
FINISHED_BUCKET_S = 10
"""Width of the time buckets of keys.finished: requests ended per model, counted by workers, read by gateways."""
FINISHED_WINDOW_BUCKETS = 6


def new_request_id() -> str:
    return uuid.uuid4().hex


class SamplingParams(BaseModel):
    max_tokens: int
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 means no top-k cut."""
    min_p: float = 0.0
    """Tokens less likely than min_p times the most likely one are not sampled (0: none cut)."""
    typical_p: float = 1.0
    """TGI's: only the tokens nearest the entropy in surprise, as many as hold this much probability (1: all)."""
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    """OpenAI's penalties, on the tokens generated so far (not the prompt's, as in vLLM): a token's logit is lowered
    by presence_penalty once it has appeared and by frequency_penalty for each time it has."""
    logit_bias: dict[int, float] = Field(default_factory=dict)
    """Token id -> a value added to its logit before the choice."""
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    """vLLM's: the stop string that ends the output stays at the end of its text."""
    stop_token_ids: list[int] = Field(default_factory=list)
    """Tokens that end the output as the end-of-sequence token does (not part of its text)."""
    min_tokens: int = 0
    """Tokens generated before the end-of-sequence token, a stop token or a stop string can end the output."""
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    """False: the output's text keeps the special tokens the model wrote (not the one that ends it)."""
    allowed_token_ids: list[int] | None = None
    """vLLM's: only these tokens may be generated (None: any)."""
    bad_words_token_ids: list[list[int]] = Field(default_factory=list)
    """vLLM's bad_words, as token sequences (each word with and without a leading space): a sequence's last token
    is ruled out where the output ends with the tokens before it."""
    logprobs: int | None = None
    """None: no log probabilities; k: each generated token's, with the k most likely tokens' at its position."""
    prompt_logprobs: int | None = None
    """The same for the prompt's tokens (FinalResult.prompt_logprobs): its KV is then computed, not reused."""
    return_tokens_as_token_ids: bool = False
    """vLLM's: log probabilities name their tokens 'token_id:<id>' instead of their text."""
    grammar: str | None = None
    """Structured output: an llguidance grammar (as `llguidance.LLMatcher.grammar_from_*` writes it) that the
    output must match; the worker allows only the tokens it allows, and ends the output where it does."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class AdapterSource(BaseModel):
    """A LoRA adapter loaded while the fleet runs (gateway.lora_adapters): the model it adapts, its directory as the
    workers see it, and the load's revision (a name loaded again in place is another adapter, its KV kept apart)."""

    model: str
    path: str
    revision: str


class InferenceRequest(BaseModel):
    id: str
    model: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    stream: bool = True
    """False: the worker writes only the final record, no per-step deltas."""
    created: float = Field(default_factory=time.time)
    deadline: float
    """Unix time after which the request ends `expired` instead of starting or continuing."""
    conversation: str | None = None
    """Affinity key: turns with the same key go to the worker that served the last one, when it can take them."""
    echo: str | None = None
    """What the response puts before the output: completions' prompt text, chat's continued assistant message."""
    tool_call: str | None = None
    """The output is a tool call (its grammar in sampling.grammar): the function's name, for a named tool_choice
    (the output is its arguments), "*" for tool_choice 'required' (a JSON list of {name, parameters}), or
    "<auto:PARSER>" for 'auto' (text that may announce calls in that parser's format); see gateway.tool_calls."""
    adapter: str | None = None
    """The model's LoRA adapter the request names (models.NAME.lora_modules, or one loaded at runtime), or None for
    the model itself."""
    adapter_source: AdapterSource | None = None
    """Where a runtime adapter lies, for the worker to load it on first use; None for a configured one."""
    cache_salt: str | None = None
    """vLLM's: the prefix cache reuses only KV computed for requests with the same salt (none: only without one)."""
    trace_headers: dict[str, str] | None = None
    """The W3C trace context (traceparent, tracestate) of the gateway's span that queued it (shared.tracing)."""
    priority: int = 0
    """Lower goes first (settings.scheduling_policy "priority"; always 0 under "fcfs")."""
    embed: bool = False
    """The request asks for its prompt's embedding (FinalResult.embedding) and ends with its prefill."""
    reasoning: Literal["open", "closed"] | None = None
    """A chat request to a model with a reasoning parser: whether its output starts inside the thinking ("open") or
    may open it ("closed"); see gateway.reasoning. None: the output is all answer."""
    return_token_ids: bool = False
    """The final record carries the output's token ids (FinalResult.token_ids); the response gives them."""
    include_reasoning: bool = True
    """False: the response leaves the thinking out (gateway.reasoning still splits it from the answer)."""
    choice_of: str | None = None
    """Set on the later choices of a request for several (n): the first choice's id, whose prompt they share."""
    batch: bool = False
    """A line of a /v1/batches job: its prompt is prefilled after the interactive prompts waiting beside it."""
    resume_token_ids: list[int] = Field(default_factory=list)
    """Set only by a worker that reclaims a request: the tokens its output stream already carries, which the
    new run takes as given and continues from (never sent again)."""


class TokenLogprob(BaseModel):
    """A generated token's log probability under the model (before temperature, penalties and bias, as vLLM reports
    them by default; after a structured output's grammar, which leaves the tokens it rules out at -9999), with the
    most likely tokens at its position, each as [text, logprob]; the ids beside them (TGI's details give both)."""

    token: str
    logprob: float | None
    """None for a prompt's first token, which nothing before it predicts."""
    top: list[tuple[str, float]] = Field(default_factory=list)
    token_id: int | None = None
    top_ids: list[int] = Field(default_factory=list)
    rank: int | None = None
    """The token's place among all tokens by log probability (1: the most likely), as vLLM's prompt_logprobs give it."""


class TokenDelta(BaseModel):
    text: str
    completion_tokens: int
    """Tokens generated so far, this delta's included: a reader relays a delta only if this exceeds what it has
    relayed, so deltas written twice (a reclaimed request) are never shown twice."""
    token_ids: list[int] = Field(default_factory=list)
    """The tokens this delta adds, so a worker that reclaims the request can resume from them."""
    logprobs: list[TokenLogprob] = Field(default_factory=list)
    """One per token of token_ids, when the request asked for log probabilities."""
    prompt_logprobs: list[TokenLogprob] = Field(default_factory=list)
    """The prompt's, on the first delta of a request that asked for them (a streamed echo shows them first)."""


class Timings(BaseModel):
    queued_s: float = 0.0
    """From acceptance by the gateway until a worker started it."""
    ttft_s: float | None = None
    """From acceptance until the first token was produced."""
    total_s: float = 0.0


class FinalResult(BaseModel):
    id: str
    model: str
    text: str = ""
    finish_reason: FinishReason
    stop_reason: str | int | None = None
    """vLLM's: the stop string or stop token id that ended a `stop` (None where the end-of-sequence token did)."""
    error: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache (OpenAI's usage.prompt_tokens_details.cached_tokens)."""
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    """Every generated token's, when the request asked for them (a stream's deltas carry them as they come too). A
    reclaimed request's holds those its last worker generated: the tokens it resumed from came with no logits."""
    prompt_logprobs: list[TokenLogprob] | None = None
    """Every prompt token's, when the request asked for them."""
    token_ids: list[int] | None = None
    """The output's token ids, when the request asked for them (InferenceRequest.return_token_ids)."""
    embedding: list[float] | None = None
    """An `embed` request's: the final norm's output at the prompt's last token, L2-normalised."""
    timings: Timings = Field(default_factory=Timings)
    worker: str | None = None
    conversation: str | None = None
    finished: float = Field(default_factory=time.time)

    @property
    def completed(self) -> bool:
        """Ended well: a stop or the length limit (not cancelled, expired or failed)."""
        return self.finish_reason in ("stop", "length")
