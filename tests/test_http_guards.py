"""What every request meets before a route: security headers, a body size bound, UTF-8 bodies only; and the connection
it comes on, kept open while the client may still reuse it."""

from __future__ import annotations

import http.client
import json
import time
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import ALLOWED_ORIGIN, MODEL, STRICT_MAX_BODY_BYTES, STRICT_MAX_FILE_BYTES
from tests.test_validation import assert_openai_error

HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("method", "path"), [("GET", "/health"), ("GET", "/v1/models"), ("GET", "/v1/nope")])
def test_security_headers_are_on_every_response(gateway_url, auth_headers, method, path):
    for headers in (auth_headers, {}):
        reply = httpx.request(method, gateway_url + path, headers=headers, timeout=10)
        assert reply.headers["x-content-type-options"] == "nosniff"
        assert reply.headers["x-frame-options"] == "DENY"
        assert "default-src 'none'" in reply.headers["content-security-policy"]
        assert reply.headers["cache-control"] == "no-store"


def test_a_configured_origin_may_call_from_a_browser_and_no_other(strict_gateway, gateway_url, auth_headers):
    preflight = {"origin": ALLOWED_ORIGIN, "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization, content-type, x-stainless-os"}  # fmt: skip
    allowed = httpx.options(f"{strict_gateway}/v1/chat/completions", headers=preflight, timeout=10)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    other = httpx.options(
        f"{strict_gateway}/v1/chat/completions", headers={**preflight, "origin": "https://evil.example"}
    )
    assert "access-control-allow-origin" not in other.headers
    # The answer itself, refusals included, is readable by the page; a gateway without origins sends no CORS headers.
    refused = httpx.get(f"{strict_gateway}/v1/models", headers={"origin": ALLOWED_ORIGIN}, timeout=10)
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    plain = httpx.get(f"{gateway_url}/v1/models", headers={**auth_headers, "origin": ALLOWED_ORIGIN}, timeout=10)
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers


def test_a_body_over_the_limit_is_413(strict_gateway, auth_headers):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x" * STRICT_MAX_BODY_BYTES}]}
    reply = httpx.post(f"{strict_gateway}/v1/chat/completions", json=body, headers=auth_headers, timeout=10)
    assert assert_openai_error(reply, 413)["code"] == "request_too_large"


def test_a_batch_file_is_held_to_the_file_limit_not_the_body_limit(strict_gateway, auth_headers):
    """A batch file of a few MB is ordinary (OpenAI takes up to 200 MB); the body limit is for request bodies."""
    line = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x" * 900}})

    def upload(size: int) -> httpx.Response:
        content = "\n".join([line] * (size // (len(line) + 1))).encode()
        files, data = {"file": ("in.jsonl", content)}, {"purpose": "batch"}
        return httpx.post(f"{strict_gateway}/v1/files", files=files, data=data, headers=auth_headers, timeout=30)

    accepted = upload(2 * STRICT_MAX_BODY_BYTES)
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["bytes"] > STRICT_MAX_BODY_BYTES
    assert assert_openai_error(upload(STRICT_MAX_FILE_BYTES + 4096), 413)["code"] == "file_too_large"


def test_a_chunked_body_over_the_limit_is_413(strict_gateway, auth_headers):
    def chunks():
        yield b'{"model": "x", "prompt": "'
        for _ in range(STRICT_MAX_BODY_BYTES // 1024 + 1):
            yield b"y" * 1024
        yield b'"}'

    headers = {**auth_headers, "content-type": "application/json"}
    reply = httpx.post(f"{strict_gateway}/v1/completions", content=chunks(), headers=headers, timeout=10)
    assert_openai_error(reply, 413)


def test_invalid_utf8_is_400(http):
    body = b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "caf\xe9 \xff"}]}'
    reply = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert assert_openai_error(reply, 400)["code"] == "invalid_encoding"


def test_an_idle_connection_outlives_the_clients_own_expiry(gateway_url):
    # httpx, and so the openai client, reuses an idle connection for up to 5 s: a gateway that closed it first would
    # reset a request sent at that moment.
    address = urlsplit(gateway_url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    try:
        for pause in (0, 5.5):
            time.sleep(pause)
            connection.request("GET", "/health")
            if pause == 0:
                first = connection.sock
            reply = connection.getresponse()  # raises RemoteDisconnected where the gateway closed the connection
            assert reply.status == 200 and reply.read()
        assert connection.sock is first  # the same connection, not a new one
    finally:
        connection.close()
