"""ASGI middleware that runs before any route: security headers on every response, API-key authentication of
/v1 requests, and a bound on request bodies (which must also be valid UTF-8).

Plain ASGI rather than BaseHTTPMiddleware, which would break streaming and the disconnect race in serving."""

from __future__ import annotations

import structlog
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import APIError

log = structlog.get_logger(__name__)

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"strict-transport-security", b"max-age=63072000; includeSubDomains"),
    (b"cache-control", b"no-store"),
]


class SecurityHeaders:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in SECURITY_HEADERS if n not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


_KEYED_OUTSIDE_V1 = frozenset({"/tokenize", "/detokenize", "/generate", "/generate_stream", "/", "/invocations"})
"""vLLM's token routes, TGI's generation routes and SageMaker's invocations, served outside /v1."""


def keyed(path: str) -> bool:
    """A path that needs an API key (and whose requests gateway.metrics counts)."""
    return path.startswith("/v1/") or path in _KEYED_OUTSIDE_V1


class Authentication:
    """Puts the caller's key on request.state (api_key, key_id, key_name), or answers 401 for the keyed paths.

    In open mode every request passes with key_id None. `state` is the app's state, whose `api_keys` the
    lifespan sets."""

    def __init__(self, app: ASGIApp, state, open_mode: bool):
        self.app = app
        self.state = state
        self.open_mode = open_mode

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        key = None
        if not self.open_mode and keyed(scope["path"]):
            scheme, _, token = (Headers(scope=scope).get("authorization") or "").partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                log.info("auth.refused", reason="missing", path=scope["path"])
                return await _refuse("You didn't provide an API key. Send 'Authorization: Bearer <key>'.")(
                    scope, receive, send
                )
            key = await self.state.api_keys.verify(token)
            if key is None:
                log.info("auth.refused", reason="unknown_or_revoked", path=scope["path"], api_key=token)
                return await _refuse("Incorrect API key provided.")(scope, receive, send)
        state = scope.setdefault("state", {})
        state["api_key"] = key
        state["key_id"] = key.id if key else None
        state["key_name"] = key.name if key else None
        await self.app(scope, receive, send)


def _refuse(message: str):
    return APIError(
        401, message, code="invalid_api_key", headers={"www-authenticate": 'Bearer realm="llmfleet"'}
    ).response()


class BodyLimit:
    """Reads the whole body (at most `max_bytes`, or the path's own limit in `path_limits`, else 413) and checks it
    is UTF-8 (else 400) before the app sees it; then hands the app the body in one message and the live receive
    channel after it."""

    def __init__(self, app: ASGIApp, max_bytes: int, path_limits: dict[str, int] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.path_limits = path_limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return await self.app(scope, receive, send)
        max_bytes = self.path_limits.get(scope["path"], self.max_bytes)
        too_large = APIError(
            413, f"The request body is larger than {max_bytes} bytes.", code="request_too_large"
        ).response()
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
            return await too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_bytes:
                return await too_large(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            return await APIError(400, "The request body is not valid UTF-8.", code="invalid_encoding").response()(
                scope, receive, send
            )
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
