"""API keys: made with `llmfleet keys`, stored only as salted hashes, required on every /v1 route."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import httpx
import openai
import pytest

from tests.conftest import MODEL
from tests.fleet import create_api_key
from tests.test_validation import assert_openai_error


def keys_cli(redis_server, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLMFLEET_REDIS_URL": redis_server.url}
    argv = [sys.executable, "-m", "llmfleet.cli", "keys", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def test_a_key_is_stored_only_as_a_salted_hash(fleet):
    secret = create_api_key(fleet.redis_server, name="stored")
    key_id = secret.split("-")[1]
    fields = fleet.redis_server.client().hgetall(f"llmfleet:apikey:{key_id}")
    random_part = secret.split("-", 2)[2]
    assert fields["name"] == "stored"
    assert not [v for v in fields.values() if random_part in v or secret in v]
    assert fields["hash"] not in (
        hashlib.sha256(random_part.encode()).hexdigest(),
        hashlib.sha256(secret.encode()).hexdigest(),
    )
    listed = json.loads(keys_cli(fleet.redis_server, "list", "--json").stdout)
    mine = [k for k in listed if k["id"] == key_id]
    assert mine and "key" not in mine[0] and "hash" not in mine[0]


def test_missing_key_is_401_even_before_the_body_is_read(gateway_url):
    reply = httpx.post(f"{gateway_url}/v1/chat/completions", content=b"{not json", timeout=10)
    error = assert_openai_error(reply, 401)
    assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"


@pytest.mark.parametrize("token", ["nonsense", "llmf-000000000000-wrong", "sk-something"])
def test_unknown_key_is_401(gateway_url, token):
    reply = httpx.get(f"{gateway_url}/v1/models", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert assert_openai_error(reply, 401)["code"] == "invalid_api_key"


def test_a_right_id_with_a_wrong_secret_is_401(gateway_url, api_key):
    forged = api_key[:-4] + ("AAAA" if not api_key.endswith("AAAA") else "BBBB")
    reply = httpx.get(f"{gateway_url}/v1/models", headers={"Authorization": f"Bearer {forged}"}, timeout=10)
    assert_openai_error(reply, 401)


def test_revoked_key_is_401_on_every_gateway(fleet, gateway_url, second_gateway_url):
    secret = create_api_key(fleet.redis_server, name="short-lived")
    headers = {"Authorization": f"Bearer {secret}"}
    assert httpx.get(f"{gateway_url}/v1/models", headers=headers, timeout=10).status_code == 200
    revoked = keys_cli(fleet.redis_server, "revoke", secret.split("-")[1])
    assert revoked.returncode == 0, revoked.stderr
    for url in (gateway_url, second_gateway_url):
        assert_openai_error(httpx.get(f"{url}/v1/models", headers=headers, timeout=10), 401)


def test_openai_client_with_a_wrong_key_raises_authentication_error(gateway_url):
    client = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="llmf-0-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])


def test_health_needs_no_key(gateway_url):
    assert httpx.get(f"{gateway_url}/health", timeout=10).status_code == 200
