"""OpenAI's Responses API (POST /v1/responses): the input (a string, or items as the Responses API writes them:
messages, function calls and their outputs, an earlier response's output included), after the conversation of
`previous_response_id` if given, becomes a chat request (function tools as chat's, gateway.tool_calls), and its result
a Response object, whole or as the API's typed stream events. Responses are stored
(gateway.response_store) unless `store` is false. Turns of one conversation keep its first messages, so they go to
the worker that holds its cache (gateway.conversations)."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from gateway import tool_calls
from gateway.errors import APIError, failure
from gateway.logprobs import token_entries
from gateway.protocol import MAX_LOGPROBS, ChatCompletionRequest, Text, _Strict
from shared.protocol import FinalResult, InferenceRequest, TokenLogprob


class ContentPart(_Strict):
    type: Literal["input_text", "output_text"]
    text: Text
    annotations: list | None = None
    logprobs: list | None = None
    """An earlier response's output part, sent back as it came: its annotations and log probabilities are ignored."""


class InputMessage(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Text | Annotated[list[ContentPart], Field(max_length=256)]
    id: str | None = None
    status: str | None = None
    phase: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(_Strict):
    """A call the model made (an earlier response's output item, sent back with its result)."""

    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1, max_length=256)]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutput(_Strict):
    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1, max_length=256)]
    output: Text
    id: str | None = None
    status: str | None = None


class ReasoningPart(_Strict):
    type: Literal["reasoning_text", "summary_text"]
    text: Text


class ReasoningItem(_Strict):
    """A reasoning model's thinking, an earlier response's output item sent back as the API asks: accepted and left
    out of the prompt (templates leave earlier turns' thinking out)."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: Annotated[list[ReasoningPart], Field(max_length=256)] = Field(default_factory=list)
    content: Annotated[list[ReasoningPart], Field(max_length=256)] | None = None
    encrypted_content: str | None = None
    status: str | None = None


def _item_type(item) -> str:
    """An input item's kind: a message may leave out its type (the API's "easy" input messages)."""
    return (item.get("type") if isinstance(item, dict) else getattr(item, "type", None)) or "message"


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutput, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type),
]


class FunctionTool(_Strict):
    type: Literal["function"]
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class NamedFunction(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


_ACCEPTED_AT = {
    "reasoning": None,
    "background": (False,),
    "truncation": ("disabled",),
    "conversation": None,
}
"""Parameters accepted only at these values (a tuple: any of them; None, or absent, always): name -> values."""


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: Text | Annotated[list[InputItem], Field(min_length=1, max_length=1024)]
    instructions: Text | None = None
    """A system message before the input."""
    max_output_tokens: Annotated[int, Field(ge=1, le=2**31)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    stream: bool | None = None
    store: bool | None = None
    """False: the response is not kept (it is by default, for `previous_response_id` and GET)."""
    text: TextConfig | None = None
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = None
    user: Annotated[Text, Field(max_length=256)] | None = None
    safety_identifier: Annotated[Text, Field(max_length=256)] | None = None
    prompt_cache_key: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    """Turns sent with the same key go to the worker that holds the conversation's cache (conversation affinity)."""
    cache_salt: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    """vLLM's, as in chat (gateway.protocol)."""
    priority: int | None = None
    """vLLM's, as in chat."""
    parallel_tool_calls: bool | None = None
    service_tier: Literal["auto", "default"] | None = None
    stream_options: dict | None = None
    previous_response_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    """As chat's: a named function or 'required' make the output the call (gateway.tool_calls); 'auto' hands back the
    calls the output announces where the model has a tool-call parser, else is a 400."""
    reasoning: dict | None = None
    include: Annotated[list[Literal["message.output_text.logprobs"]], Field(max_length=1)] | None = None
    """The output's log probabilities (with `top_logprobs` alternatives a token), the one inclusion we have."""
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    background: bool | None = None
    truncation: str | None = None
    conversation: str | dict | None = None

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        for name in self.model_extra or {}:
            raise APIError(400, f"Unsupported parameter: '{name}'.", param=name, code="unsupported_parameter")
        for name, accepted in _ACCEPTED_AT.items():
            value = getattr(self, name)
            if value is not None and value != accepted and not (isinstance(accepted, tuple) and value in accepted):
                raise APIError(400, f"Unsupported value for '{name}'.", param=name, code="unsupported_value")
        return self

    @property
    def stored(self) -> bool:
        return self.store is not False

    @property
    def logprobs(self) -> bool:
        return bool(self.include)


def _given(body: ResponsesRequest) -> list[InputItem]:
    """The input as items: a string is one user message."""
    return [InputMessage(role="user", content=body.input)] if isinstance(body.input, str) else body.input


def conversation(body: ResponsesRequest, earlier: list[dict]) -> list[dict]:
    """The chat messages `body` answers, without its instructions: the earlier conversation's, then its input's
    (a run of function calls one assistant message with tool calls, each call's output a tool message)."""
    messages = list(earlier)
    for item in _given(body):
        if isinstance(item, InputMessage):
            messages.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallOutput):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            if not (messages and messages[-1].get("tool_calls")):
                messages.append({"role": "assistant", "content": None, "tool_calls": []})
            messages[-1]["tool_calls"].append(call)
    return messages


def input_items(body: ResponsesRequest, response_id: str) -> list[dict]:
    """The request's input as the API lists it (GET /v1/responses/{id}/input_items), each item with an id."""
    items = []
    for i, item in enumerate(_given(body)):
        if isinstance(item, InputMessage):
            part = _text_part(item.text()) if item.role == "assistant" else {"type": "input_text", "text": item.text()}
            content = [part]
            items.append({"type": "message", "role": item.role, "content": content, "status": "completed"})
        else:
            items.append({**item.model_dump(exclude_none=True), "status": "completed"})
        items[-1]["id"] = item.id or f"{response_id.replace('resp_', 'item_', 1)}_{i}"
    return items


def _chat_tools(body: ResponsesRequest) -> dict:
    if not body.tools:
        return {"tool_choice": body.tool_choice}
    tools = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)} for t in body.tools]
    choice = body.tool_choice
    if isinstance(choice, NamedFunction):
        choice = {"type": "function", "function": {"name": choice.name}}
    return {"tools": tools, "tool_choice": choice, "parallel_tool_calls": body.parallel_tool_calls}


def chat_request(body: ResponsesRequest, messages: list[dict]) -> ChatCompletionRequest:
    """The chat request that answers `body`, whose conversation is `messages`."""
    instructions = [{"role": "system", "content": body.instructions}] if body.instructions else []
    fields = {
        "model": body.model,
        "messages": instructions + messages,
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "stream": body.stream,
        "user": body.user or body.safety_identifier,
        "prompt_cache_key": body.prompt_cache_key,
        "cache_salt": body.cache_salt,
        "priority": body.priority,
        "response_format": _response_format(body.text.format) if body.text and body.text.format else None,
        "logprobs": body.logprobs or None,
        "top_logprobs": (body.top_logprobs or 0) if body.logprobs else None,
        **_chat_tools(body),
    }
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as error:
        raise APIError(400, f"Invalid input: {error.errors()[0]['msg']}.", param="input") from None


_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}
"""A chat request's parameters as the Responses API names them, for the errors it raises."""


def in_its_terms(error: APIError) -> APIError:
    """An error of the chat request, naming the Responses API's parameter."""
    error.param = _PARAMS.get(error.param, error.param)
    return error


def _response_format(fmt: TextFormat) -> dict:
    if fmt.type != "json_schema":
        return {"type": fmt.type}
    if fmt.name is None or fmt.schema_ is None:
        raise APIError(400, "A 'json_schema' format needs 'name' and 'schema'.", param="text.format")
    schema = {"name": fmt.name, "schema": fmt.schema_, "description": fmt.description, "strict": fmt.strict}
    return {"type": "json_schema", "json_schema": {k: v for k, v in schema.items() if v is not None}}


def _usage(final: FinalResult) -> dict:
    return {
        "input_tokens": final.prompt_tokens,
        "input_tokens_details": {"cached_tokens": final.cached_tokens},
        "output_tokens": final.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": final.prompt_tokens + final.completion_tokens,
    }


def _text_part(text: str, logprobs: list[TokenLogprob] | None = None) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": token_entries(logprobs or [])}


class ResponseWriter:
    """A request's Response object and, for a stream, its events in order (each with its sequence number). A
    tool-calling request's output is its calls, sent whole when it ends (as chat streams them); a reasoning model's
    is its thinking (a reasoning item) and its answer, both sent whole when it ends."""

    def __init__(self, body: ResponsesRequest, request: InferenceRequest):
        self.body = body
        self.request = request
        self.item_id = f"msg_{request.id}"
        self._sequence = 0
        self._opened = request.tool_call is None and request.reasoning is None
        """Whether the stream opened the output message at its start (text streams as it comes)."""

    def response(self, final: FinalResult | None = None) -> dict:
        """The Response: in progress without `final`, else as it ended (failed ones included, for a stream)."""
        status, output, error, incomplete = "in_progress", [], None, None
        if final is not None:
            status = {"stop": "completed", "length": "incomplete"}.get(final.finish_reason, "failed")
            if final.completed:
                output = self._output(final, status)
            else:
                error = {"code": "server_error", "message": failure(final).message}
            if status == "incomplete":
                incomplete = {"reason": "max_output_tokens"}
        body = self.body
        text_format = body.text.format if body.text and body.text.format else TextFormat(type="text")
        return {
            "id": f"resp_{self.request.id}",
            "object": "response",
            "created_at": int(self.request.created),
            "status": status,
            "model": body.model,
            "output": output,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "tool_choice": _dumped(body.tool_choice) or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "text": {"format": text_format.model_dump(by_alias=True, exclude_none=True)},
            "metadata": body.metadata or {},
            "previous_response_id": body.previous_response_id,
            "store": body.stored,
            "usage": _usage(final) if final is not None else None,
        }

    def _output(self, final: FinalResult, status: str) -> list[dict]:
        message, _ = tool_calls.message(self.request, final)
        calls = message.get("tool_calls") or []
        thought = [self._reasoning(message["reasoning"], "completed")] if message.get("reasoning") else []
        if not calls:
            return thought + [self._message(status, _text_part(message["content"] or "", final.logprobs))]
        return thought + [
            {"id": f"fc_{call['id']}", "type": "function_call", "status": "completed", "call_id": call["id"],
             "name": call["function"]["name"], "arguments": call["function"]["arguments"]}
            for call in calls
        ]  # fmt: skip

    def _reasoning(self, text: str, status: str) -> dict:
        content = [{"type": "reasoning_text", "text": text}] if text else []
        return {"id": f"rs_{self.request.id}", "type": "reasoning", "summary": [], "content": content, "status": status}

    def _message(self, status: str, part: dict | None = None) -> dict:
        """The output message: in progress (no content yet) without its text `part`."""
        content = [part] if part is not None else []
        return {"id": self.item_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def _event(self, kind: str, **fields) -> dict:
        """One server-sent event: the type as the SSE event name and in the data, as OpenAI sends them."""
        data = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return {"event": kind, "data": json.dumps(data)}

    def _open_message(self, index: int = 0) -> list[dict]:
        where = {"item_id": self.item_id, "output_index": index, "content_index": 0}
        return [
            self._event("response.output_item.added", output_index=index, item=self._message("in_progress")),
            self._event("response.content_part.added", **where, part=_text_part("")),
        ]

    def opening(self) -> list[dict]:
        started = [self._event(f"response.{kind}", response=self.response()) for kind in ("created", "in_progress")]
        return started + (self._open_message() if self._opened else [])

    def delta(self, text: str, logprobs: list[TokenLogprob]) -> dict | None:
        if not self._opened:
            return None
        return self._event(
            "response.output_text.delta", item_id=self.item_id, output_index=0, content_index=0, delta=text,
            logprobs=token_entries(logprobs),
        )  # fmt: skip

    def closing(self, final: FinalResult) -> list[dict]:
        response = self.response(final)
        if response["status"] == "failed":
            return [self._event("response.failed", response=response)]
        events = []
        ends = {"message": self._message_end, "function_call": self._call_events, "reasoning": self._reasoning_events}
        for index, item in enumerate(response["output"]):
            events += ends[item["type"]](index, item)
        return events + [self._event(f"response.{response['status']}", response=response)]

    def _message_end(self, index: int, item: dict) -> list[dict]:
        where = {"item_id": self.item_id, "output_index": index, "content_index": 0}
        (part,) = item["content"]
        events = []
        if not self._opened:  # a tool call's output that ended as text (cut short), a reasoning model's answer
            events += self._open_message(index)
            events.append(
                self._event("response.output_text.delta", **where, delta=part["text"], logprobs=part["logprobs"])
            )
        return events + [
            self._event("response.output_text.done", **where, text=part["text"], logprobs=part["logprobs"]),
            self._event("response.content_part.done", **where, part=part),
            self._event("response.output_item.done", output_index=index, item=item),
        ]

    def _reasoning_events(self, index: int, item: dict) -> list[dict]:
        where, text = {"item_id": item["id"], "output_index": index, "content_index": 0}, item["content"][0]["text"]
        return [
            self._event("response.output_item.added", output_index=index, item=self._reasoning("", "in_progress")),
            self._event("response.reasoning_text.delta", **where, delta=text),
            self._event("response.reasoning_text.done", **where, text=text),
            self._event("response.output_item.done", output_index=index, item=item),
        ]

    def _call_events(self, index: int, item: dict) -> list[dict]:
        where, arguments = {"item_id": item["id"], "output_index": index}, item["arguments"]
        started = {**item, "status": "in_progress", "arguments": ""}
        return [
            self._event("response.output_item.added", output_index=index, item=started),
            self._event("response.function_call_arguments.delta", **where, delta=arguments),
            self._event("response.function_call_arguments.done", **where, name=item["name"], arguments=arguments),
            self._event("response.output_item.done", output_index=index, item=item),
        ]


def _dumped(value):
    return value.model_dump() if isinstance(value, BaseModel) else value
