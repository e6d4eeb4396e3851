"""OpenAI-compatible request bodies, with bounds on every field.

A parameter we do not implement is refused with a 400 that names it, rather than silently ignored; parameters
that only matter at a non-default value (best_of) are accepted at their default."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, model_validator

from gateway.errors import APIError
from gateway.sanitize import clean_text

Text = Annotated[str, AfterValidator(clean_text)]
"""Any text a client sends: valid Unicode, NFC, no control characters (see gateway.sanitize)."""

TokenId = Annotated[int, Field(ge=0, lt=2**31)]
"""A token id as a client sends it; the gateway checks it against the model's vocabulary (prompts.check_token_ids)."""


class _Strict(BaseModel):
    """A body, or part of one, that refuses fields it does not define (a 400 naming them)."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False
    """vLLM's: with include_usage, every chunk carries the usage so far."""


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class FunctionCall(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    arguments: str
    """JSON, as the model wrote it."""


class ToolCall(_Strict):
    id: Annotated[str, Field(min_length=1, max_length=256)]
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[TextPart], Field(max_length=256)] | None = None
    name: Annotated[Text, Field(max_length=64)] | None = None
    tool_calls: Annotated[list[ToolCall], Field(min_length=1, max_length=128)] | None = None
    """An assistant turn's calls (its content may then be null)."""
    tool_call_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    """A tool message's answer to that call."""
    reasoning: Text | None = Field(default=None, validation_alias=AliasChoices("reasoning", "reasoning_content"))
    """An assistant turn's thinking, sent back as a reasoning model's response gave it (gateway.reasoning; vLLM's
    older name accepted too); templates get it as `reasoning_content`, and most leave earlier turns' out."""

    @model_validator(mode="after")
    def _fields_of_its_role(self):
        if self.content is None and not self.tool_calls:
            raise APIError(400, "A message needs 'content' (or, from the assistant, 'tool_calls').", param="messages")
        for field in ("tool_calls", "reasoning"):
            if getattr(self, field) and self.role != "assistant":
                raise APIError(400, f"Only assistant messages carry '{field}'.", param="messages")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise APIError(400, "A tool message, and only a tool message, carries 'tool_call_id'.", param="messages")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDefinition(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: str | None = None
    parameters: dict = Field(default_factory=dict)
    """A JSON schema of the arguments object ({}: no arguments)."""
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's response_format: plain text, any JSON object, or JSON that matches a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise APIError(
                400,
                "'json_schema' is required with type 'json_schema', and only with it.",
                param="response_format",
                code="invalid_value",
            )
        return self


class StructuredOutputs(_Strict):
    """vLLM's structured_outputs: the output matches a JSON schema, a regular expression, one of the choices, or a
    grammar (Lark or GBNF); exactly one of them."""

    json_: dict | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1, max_length=1024)] | None = None
    grammar: str | None = None
    json_object: bool = False

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [self.json_, self.regex, self.choice, self.grammar, self.json_object or None]
        if sum(value is not None for value in given) != 1:
            raise APIError(
                400,
                "'structured_outputs' takes exactly one of 'json', 'regex', 'choice', 'grammar', 'json_object'.",
                param="structured_outputs",
                code="invalid_value",
            )
        return self


MAX_CHOICES = 16
"""The most choices (`n`) a request may ask for: each is a sequence in a worker's batch."""

MAX_SEQUENCES = 64
"""The most sequences one request may start: its prompts (completions take several) times its choices."""

MAX_STOP_SEQUENCES = 8

MAX_LOGPROBS = 20
"""The most alternatives a token's log probabilities list (OpenAI's chat bound, and vLLM's default)."""

_NULL_IS_DEFAULT = frozenset(
    {
        "temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty", "frequency_penalty", "stream",
        "ignore_eos", "logprobs", "n", "min_tokens", "min_p", "typical_p", "skip_special_tokens",
        "include_stop_str_in_output", "return_tokens_as_token_ids",
    }
)  # fmt: skip
"""Fields OpenAI's schema (and vLLM) take as null, meaning their default: clients and proxies send explicit nulls."""


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")
    default_only: ClassVar[dict[str, object]] = {"best_of": 1}
    """Parameters accepted only at their default: name -> the only value we accept."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in _NULL_IS_DEFAULT)}
        return data

    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: Annotated[int, Field(ge=0, le=2**31)] | None = None
    """0 only with completions' echo: the prompt scored, nothing generated."""
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=0, le=100_000)] = 0
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """vLLM's: tokens less likely than min_p times the most likely one are not sampled."""
    typical_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    """TGI's locally typical sampling (also on its /generate routes): 1 is off."""
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    logit_bias: (
        Annotated[
            dict[TokenId, Annotated[float, Field(ge=-100, le=100)]],
            Field(max_length=1024),
        ]
        | None
    ) = None
    """Token id (a JSON key, so a string) -> a value added to its logit; -100 bans the token, 100 all but forces it."""
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    stop: (
        Annotated[Text, Field(max_length=256)]
        | Annotated[list[Annotated[Text, Field(min_length=1, max_length=256)]], Field(max_length=MAX_STOP_SEQUENCES)]
        | None
    ) = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None
    """vLLM's: token ids that end the output as the end-of-sequence token does."""
    include_stop_str_in_output: bool = False
    """vLLM's: the stop string that ended the output stays at its end."""
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1, max_length=1 << 18)] | None = None
    """vLLM's: only these tokens may be generated."""
    bad_words: Annotated[list[Annotated[Text, Field(max_length=256)]], Field(max_length=256)] | None = None
    """vLLM's: words never generated (each one's last token is ruled out after the tokens before it)."""
    truncate_prompt_tokens: Annotated[int, Field(ge=-1, le=2**31)] | None = None
    """vLLM's: only the prompt's last this many tokens are kept (-1: what fits in the context beside the output)."""
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    """vLLM's: each prompt token's log probability and rank, with this many most likely tokens at its position."""
    return_tokens_as_token_ids: bool = False
    """vLLM's: log probabilities name their tokens as 'token_id:<id>' (for tokens that are not whole text)."""
    return_token_ids: bool = False
    """vLLM's: the response gives the prompt's token ids and each choice's output token ids (streamed: the prompt's
    in the first chunk, and each chunk the ids of its own tokens)."""
    min_tokens: Annotated[int, Field(ge=0, le=2**31)] = 0
    """vLLM's: no end-of-sequence token, stop token or stop string ends the output before this many tokens."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    """Benchmarks only: generate exactly max_tokens (as vLLM accepts it)."""
    skip_special_tokens: bool = True
    """vLLM's: False keeps special tokens (other than the end of the output) in the text."""
    user: Annotated[Text, Field(max_length=256)] | None = None
    conversation_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    """Affinity hint (also accepted as the X-Conversation-Id header): turns of one conversation reuse one cache."""
    prompt_cache_key: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    """OpenAI's name for the same hint."""
    cache_salt: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    """vLLM's: the prompt's KV is reused only from requests with the same salt, so tenants that each send their own
    (random, unguessable) salt cannot learn from cached_tokens or timings what others' prompts begin with."""

    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    """Choices: each runs as a request of its own (its own id and seed; the later ones copy the first one's prompt KV
    where they share its worker)."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    """Structured output (see gateway.structured_output): at most one of the two, other than response_format text."""

    best_of: int | None = None
    priority: Annotated[int, Field(ge=-(2**31), le=2**31 - 1)] | None = None
    """vLLM's: lower goes first, where settings.scheduling_policy is "priority" (elsewhere only 0)."""
    echo: bool | None = None
    """Completions: the prompt's text (and with logprobs, its tokens' log probabilities) before the output. Chat
    (vLLM's): a final assistant message that is continued (continue_final_message) before the output."""

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        for name in self.model_extra or {}:
            raise APIError(400, f"Unsupported parameter: '{name}'.", param=name, code="unsupported_parameter")
        for name, accepted in self.default_only.items():
            value = getattr(self, name)
            if value is not None and value != accepted:
                raise APIError(
                    400,
                    f"Unsupported value for '{name}': only {accepted!r} is supported.",
                    param=name,
                    code="unsupported_value",
                )
        return self

    @model_validator(mode="after")
    def _values_fit_together(self):
        rule = next(iter(self.token_rules), None)
        max_tokens = self.requested_max_tokens
        refusals = [
            (self.stream and self.prompt_logprobs is not None, "prompt_logprobs", "unsupported_value",
             "'prompt_logprobs' come with the whole response; ask without 'stream'."),
            (self.truncate_prompt_tokens == 0, "truncate_prompt_tokens", "invalid_value",
             "'truncate_prompt_tokens' must be -1 or at least 1."),
            (self.max_tokens == 0 and not self.echo, "max_tokens", "invalid_value",
             "max_tokens must be at least 1 (0 only with echo)."),
            (self.min_tokens and max_tokens is not None and self.min_tokens > max_tokens, "min_tokens", "invalid_value",
             "'min_tokens' exceeds 'max_tokens'."),
            (self.structured and rule, rule, "invalid_value", f"'{rule}' does not combine with structured output."),
        ]  # fmt: skip
        for refused, param, code, message in refusals:
            if refused:
                raise APIError(400, message, param=param, code=code)
        return self

    @property
    def token_rules(self) -> list[str]:
        """The parameters given that rule tokens out regardless of a grammar, which could then leave a step no token
        it allows (min_tokens also where the grammar ends the output)."""
        return [name for name in ("min_tokens", "allowed_token_ids", "bad_words") if getattr(self, name)]

    @property
    def structured(self) -> bool:
        """Structured output asked for (a response_format other than text, or structured_outputs)."""
        return bool(self.structured_outputs or (self.response_format and self.response_format.type != "text"))

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in stops if s]  # a stop string may be empty once control characters are stripped


_TEMPLATE_ARGUMENTS = frozenset(
    {"messages", "conversations", "tools", "documents", "chat_template", "add_generation_prompt",
     "continue_final_message", "return_assistant_tokens_mask"}
)  # fmt: skip
"""What the gateway passes a chat template itself: not for chat_template_kwargs to set."""


class TemplateOptions(BaseModel):
    """How chat messages go through the model's chat template (vLLM's chat parameters)."""

    add_generation_prompt: bool = True
    """The template's opening of the assistant's turn after the messages."""
    continue_final_message: bool = False
    """The last message is the assistant's, left open: the output continues its text (a prefilled answer)."""
    chat_template_kwargs: (
        Annotated[
            dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=64)], Any],
            Field(max_length=64),
        ]
        | None
    ) = None
    """More variables for the template (e.g. a model's `enable_thinking`); a template ignores those it does not use."""

    @model_validator(mode="after")
    def _check_template_options(self):
        if self.add_generation_prompt and self.continue_final_message:
            raise APIError(
                400, "'continue_final_message' needs 'add_generation_prompt' set to false.",
                param="continue_final_message", code="invalid_value",
            )  # fmt: skip
        taken = sorted(_TEMPLATE_ARGUMENTS & set(self.chat_template_kwargs or {}))
        if taken:
            raise APIError(
                400, f"'chat_template_kwargs' may not set '{taken[0]}'.", param="chat_template_kwargs",
                code="invalid_value",
            )  # fmt: skip
        return self


class ChatCompletionRequest(_SamplingFields, TemplateOptions):
    default_only: ClassVar[dict[str, object]] = {**_SamplingFields.default_only, "store": False}
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=2**31)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    """False: tool_choice 'required' makes exactly one call."""
    include_reasoning: bool = True
    """vLLM's: False leaves a reasoning model's thinking out of the response (the answer is still the text after it)."""
    # OpenAI's parameters that leave the output as it is, as SDKs and agent frameworks send them.
    store: bool | None = None
    """Stored chat completions: only false (nothing is stored; the Responses API stores responses)."""
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = None
    service_tier: Literal["auto", "default"] | None = None
    modalities: list[Literal["text"]] | None = None
    safety_identifier: Annotated[Text, Field(max_length=256)] | None = None
    """OpenAI's successor of `user`, logged as it is."""

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise APIError(
                400, "'top_logprobs' needs 'logprobs' set to true.", param="top_logprobs", code="invalid_value"
            )
        return self

    @property
    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _check_roles_and_order(self):
        """System/developer messages only lead; then the turns start with the user and end with the user or with
        tool results, which answer the assistant turn with tool calls before them (or, to be continued, with the
        assistant)."""
        roles = [m.role for m in self.messages]
        leading = 0
        while leading < len(roles) and roles[leading] in ("system", "developer"):
            leading += 1
        turns = self.messages[leading:]
        if any(m.role in ("system", "developer") for m in turns):
            raise _order_error("System and developer messages must come before the conversation.")
        last = ("assistant",) if self.continue_final_message else ("user", "tool")
        if not turns or turns[0].role != "user" or turns[-1].role not in last:
            raise _order_error(
                "The conversation must start with a user message and end with an assistant one to continue."
                if self.continue_final_message
                else "The conversation must start with a user message and end with a user or tool one."
            )
        for before, message in zip(turns, turns[1:]):
            if message.role == "tool" and not (before.role == "tool" or before.tool_calls):
                raise _order_error("A tool message must follow an assistant message with tool calls.")
        return self

    @model_validator(mode="after")
    def _check_tool_choice(self):
        choice = self.tool_choice
        names = [t.function.name for t in self.tools or []]
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise APIError(
                400, f"tool_choice names '{choice.function.name}', which is not in 'tools'.", param="tool_choice",
                code="invalid_value",
            )  # fmt: skip
        if choice == "required" and not names:
            raise APIError(400, "tool_choice 'required' needs 'tools'.", param="tool_choice", code="invalid_value")
        if self.calls_tools and (self.structured or self.token_rules):
            raise APIError(
                400, "Tool calls do not combine with structured output, min_tokens, allowed_token_ids or bad_words.",
                param="tool_choice", code="invalid_value",
            )  # fmt: skip
        return self

    @property
    def calls_tools(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1, max_length=MAX_SEQUENCES)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[
            list[Annotated[list[TokenId], Field(min_length=1)]],
            Field(min_length=1, max_length=MAX_SEQUENCES),
        ]  # a batch of prompts of token ids, as lm-evaluation-harness sends them
    )
    """One prompt, or a batch of them: each runs as a request of its own, its choices numbered after the ones
    before it (prompt index x n + choice index), as OpenAI's API numbers them."""
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @model_validator(mode="after")
    def _sequences_bounded(self):
        if len(self.prompts) * self.n > MAX_SEQUENCES:
            raise APIError(
                400, f"Prompts times 'n' may be at most {MAX_SEQUENCES}.", param="prompt", code="invalid_value"
            )  # fmt: skip
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            return [prompt]
        return list(prompt)

    def one_per_prompt(self) -> list[CompletionRequest]:
        return [self.model_copy(update={"prompt": prompt}) for prompt in self.prompts]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def logprobs_count(self) -> int | None:
        return self.logprobs


class TokenizeRequest(TemplateOptions, _Strict):
    """POST /tokenize, as vLLM has it: a prompt's ids, or chat messages' ids through the model's chat template."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)] | None = None
    add_special_tokens: bool = True
    """For a prompt: the tokenizer's own special tokens (a BOS, where it adds one); a template places its own."""

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "Give either 'prompt' or 'messages'.", param="prompt", code="invalid_value")
        return self


class DetokenizeRequest(_Strict):
    """POST /detokenize, as vLLM has it."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    tokens: list[TokenId]


class BatchCreateRequest(_Strict):
    """POST /v1/batches, as OpenAI's Batch API has it."""

    input_file_id: Annotated[str, Field(min_length=1, max_length=256)]
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings"]
    completion_window: Literal["24h"]
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = None


def _order_error(message: str) -> APIError:
    return APIError(400, message, param="messages", code="invalid_message_order")
