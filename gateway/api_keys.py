"""API keys: created, listed and revoked by `llmfleet keys`, verified by the gateway on every /v1 request.

A key reads `llmf-<id>-<secret>`. Redis holds, under keys.api_key(id), the key's name and limits and only a
salted SHA-256 of the secret: the secret is shown once, at creation. The secret is 256 random bits, so a fast
hash is enough (a slow one would only make refusing bad keys expensive), and the id in the key makes
verification one HGETALL instead of a scan."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

import redis.asyncio as aioredis
from pydantic import BaseModel, Field

from shared import keys

PREFIX = "llmf"


class ApiKey(BaseModel):
    id: str
    name: str
    rpm: int = Field(ge=1)
    """Requests per minute."""
    tpm: int = Field(ge=1)
    """Tokens per minute: prompt tokens at admission, output tokens as they are generated."""
    max_concurrency: int = Field(ge=1)
    admin: bool = False
    """May load and unload LoRA adapters while the fleet runs (gateway.lora_adapters)."""
    created: float
    revoked: float | None = None


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(f"{salt}:{secret}".encode()).hexdigest()


def split(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, else None."""
    parts = token.split("-", 2)
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


class ApiKeys:
    def __init__(self, client: aioredis.Redis):
        self.redis = client

    async def create(
        self, name: str, rpm: int, tpm: int, max_concurrency: int, admin: bool = False
    ) -> tuple[ApiKey, str]:
        """The new key's record and its full secret form, which nothing stores."""
        key = ApiKey(
            id=secrets.token_hex(6), name=name, rpm=rpm, tpm=tpm, max_concurrency=max_concurrency, admin=admin,
            created=time.time(),
        )  # fmt: skip
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        fields = {**key.model_dump(exclude={"revoked"}), "salt": salt, "hash": _digest(salt, secret)}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.api_key(key.id), mapping={k: str(v) for k, v in fields.items()})
            pipe.sadd(keys.api_keys(), key.id)
            await pipe.execute()
        return key, f"{PREFIX}-{key.id}-{secret}"

    async def list(self) -> list[ApiKey]:
        ids = sorted(await self.redis.smembers(keys.api_keys()))
        async with self.redis.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hgetall(keys.api_key(key_id))
            records = await pipe.execute()
        found = [_from_fields(fields) for fields in records if fields]
        return sorted(found, key=lambda k: k.created)

    async def revoke(self, key_id: str) -> ApiKey | None:
        if not await self.redis.exists(keys.api_key(key_id)):
            return None
        await self.redis.hsetnx(keys.api_key(key_id), "revoked", str(time.time()))
        return _from_fields(await self.redis.hgetall(keys.api_key(key_id)))

    async def verify(self, token: str) -> ApiKey | None:
        """The key `token` names if it exists, is not revoked and its secret matches; else None."""
        parsed = split(token)
        if parsed is None:
            return None
        key_id, secret = parsed
        fields = await self.redis.hgetall(keys.api_key(key_id))
        if not fields or fields.get("revoked"):
            return None
        if not hmac.compare_digest(fields["hash"], _digest(fields["salt"], secret)):
            return None
        return _from_fields(fields)


def _from_fields(fields: dict[str, str]) -> ApiKey:
    return ApiKey.model_validate({k: v for k, v in fields.items() if k not in ("salt", "hash")})
