"""The affinity key of a request: which conversation it continues, so its turns can go to one worker's cache."""

from __future__ import annotations

import hashlib

from gateway.protocol import ChatCompletionRequest, CompletionRequest

HEADER = "x-conversation-id"


def conversation_key(body: ChatCompletionRequest | CompletionRequest, header: str | None) -> str:
    """The client's own id (header, `conversation_id` or `prompt_cache_key`) when given; otherwise a hash of what
    every turn of the conversation starts with: the system messages and the first user message (or a plain
    prompt's start)."""
    given = header or body.conversation_id or body.prompt_cache_key
    if given:
        return "id:" + hashlib.sha256(given.encode()).hexdigest()[:32]
    if isinstance(body, ChatCompletionRequest):
        leading = []
        for message in body.messages:
            leading.append(f"{message.role}\x00{message.text()}")
            if message.role == "user":
                break
        material = "\x01".join(leading)
    else:
        material = str(body.prompt)[:1024]
    return "h:" + hashlib.sha256(material.encode()).hexdigest()[:32]
