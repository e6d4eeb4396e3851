"""Per-key limits, enforced by Lua scripts inside Redis so that they hold across any number of gateways.

- requests per minute: a sliding log (keys.rate_requests), exact: the (rpm+1)-th request in any 60 s is refused.
- tokens per minute: a token bucket (keys.rate_tokens) of `tpm` tokens refilled continuously at tpm/60 per
  second. Prompt tokens are taken at admission; output tokens are charged while they are generated and may
  take the bucket below zero, which refuses the key's next requests until it has refilled. A job, which no
  gateway follows, is charged its prompt plus max_tokens at admission instead (gateway.serving.enqueue).
- concurrency: a sorted set of in-flight request ids (keys.inflight) whose scores are lease expiries, so a
  gateway that dies mid-request leaks nothing for longer than a request may live.

Time is Redis's own clock (TIME), never a gateway's."""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis.asyncio as aioredis

from gateway.api_keys import ApiKey
from gateway.errors import APIError
from shared import keys

WINDOW_S = 60
CHARGE_EVERY_TOKENS = 16
"""Output tokens are charged in batches of this many while a response streams, and the rest at its end."""

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
"""

_BUCKET = """
local function bucket(key, tpm, now)
  local b = redis.call('HMGET', key, 'level', 'at')
  local level = tonumber(b[1]) or tpm
  local at = tonumber(b[2]) or now
  return math.min(tpm, level + (now - at) * tpm / 60)
end
local function store(key, level, tpm, now)
  redis.call('HSET', key, 'level', tostring(level), 'at', tostring(now))
  redis.call('EXPIRE', key, math.ceil((tpm - level) * 60 / tpm) + 1)
end
"""

# KEYS: rpm log, tpm bucket, inflight set. ARGV: request id, rpm, tpm, max concurrency (0: do not hold a
# slot), prompt tokens, lease seconds. Returns verdict, retry-after s, requests used, token level, and the
# seconds until each limit is back to its full allowance.
_ADMIT = (
    _NOW
    + _BUCKET
    + """
local rid, rpm, tpm = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local conc, cost, lease = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local running = redis.call('ZCARD', KEYS[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60)
local used = redis.call('ZCARD', KEYS[1])
local level = bucket(KEYS[2], tpm, now)
local function requests_reset()
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if oldest[2] == nil then return 0 end
  return tonumber(oldest[2]) + 60 - now
end
local verdict, retry = 'ok', 0
if conc > 0 and running >= conc then
  verdict, retry = 'concurrency', 1
elseif used >= rpm then
  verdict, retry = 'requests', requests_reset()
elseif cost > tpm then
  verdict = 'too_large'
elseif level < cost then
  verdict, retry = 'tokens', (cost - level) * 60 / tpm
else
  redis.call('ZADD', KEYS[1], now, rid)
  redis.call('EXPIRE', KEYS[1], 61)
  used = used + 1
  level = level - cost
  if conc > 0 then
    redis.call('ZADD', KEYS[3], now + lease, rid)
    redis.call('EXPIRE', KEYS[3], math.ceil(lease) + 1)
  end
end
store(KEYS[2], level, tpm, now)
return {verdict, tostring(retry), used, tostring(level), tostring(requests_reset()),
        tostring((tpm - level) * 60 / tpm)}
"""
)

# KEYS: tpm bucket. ARGV: tpm, tokens to take (negative: give back).
_CHARGE = (
    _NOW
    + _BUCKET
    + """
local tpm = tonumber(ARGV[1])
store(KEYS[1], bucket(KEYS[1], tpm, now) - tonumber(ARGV[2]), tpm, now)
return 1
"""
)


def _duration(seconds: float) -> str:
    """OpenAI's form for x-ratelimit-reset-*: 120ms, 6s, 1m30s."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


@dataclass
class Admission:
    """One admitted request's hold on its key's limits: charge output to it, then release it."""

    limiter: RateLimiter
    key: ApiKey
    request_id: str
    headers: dict[str, str]
    charged_output: int = 0

    async def charge_output(self, completion_tokens: int, final: bool = False) -> None:
        """Charge the output generated so far (`completion_tokens` in total), in batches unless `final`."""
        pending = completion_tokens - self.charged_output
        if pending > 0 and (final or pending >= CHARGE_EVERY_TOKENS):
            self.charged_output = completion_tokens
            await self.limiter.charge(self.key, pending)

    async def release(self) -> None:
        await self.limiter.redis.zrem(keys.inflight(self.key.id), self.request_id)

    async def refund(self, tokens: int) -> None:
        """Undo the admission of a request that was then not queued (no worker, queue full): give back `tokens`."""
        async with self.limiter.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(keys.inflight(self.key.id), self.request_id)
            pipe.zrem(keys.rate_requests(self.key.id), self.request_id)
            await pipe.execute()
        await self.limiter.charge(self.key, -tokens)


class RateLimiter:
    def __init__(self, client: aioredis.Redis, lease_s: float):
        self.redis = client
        self.lease_s = lease_s
        self._admit = client.register_script(_ADMIT)
        self._charge = client.register_script(_CHARGE)

    async def admit(self, key: ApiKey, request_id: str, tokens: int, hold_slot: bool = True) -> Admission:
        """Take one request and `tokens` from `key`'s allowance, or raise a 429 saying which limit."""
        verdict, retry, used, level, requests_reset, tokens_reset = await self._admit(
            keys=[keys.rate_requests(key.id), keys.rate_tokens(key.id), keys.inflight(key.id)],
            args=[request_id, key.rpm, key.tpm, key.max_concurrency if hold_slot else 0, tokens, self.lease_s],
        )
        headers = {
            "x-ratelimit-limit-requests": str(key.rpm),
            "x-ratelimit-limit-tokens": str(key.tpm),
            "x-ratelimit-remaining-requests": str(max(0, key.rpm - int(used))),
            "x-ratelimit-remaining-tokens": str(max(0, math.floor(float(level)))),
            "x-ratelimit-reset-requests": _duration(float(requests_reset)),
            "x-ratelimit-reset-tokens": _duration(float(tokens_reset)),
        }
        if verdict == "ok":
            return Admission(self, key, request_id, headers)
        raise _refusal(verdict, key, tokens, int(used), float(level), float(retry), headers)

    async def charge(self, key: ApiKey, tokens: int) -> None:
        await self._charge(keys=[keys.rate_tokens(key.id)], args=[key.tpm, tokens])


def _refusal(
    verdict: str, key: ApiKey, cost: int, used: int, level: float, retry: float, headers: dict[str, str]
) -> APIError:
    if verdict == "too_large":
        message = (
            f"Request too large for tokens per min (TPM): Limit {key.tpm}, Requested {cost}. Send a shorter prompt."
        )
        return APIError(429, message, code="request_too_large", headers=headers)
    wait = _duration(retry)
    if verdict == "concurrency":
        message = f"Too many concurrent requests: Limit {key.max_concurrency}. Please try again when one has finished."
        code = "concurrency_limit_exceeded"
    elif verdict == "requests":
        message = (
            f"Rate limit reached for requests per min (RPM): Limit {key.rpm}, Used {used}, Requested 1. "
            f"Please try again in {wait}."
        )
        code = "rate_limit_exceeded"
    else:
        message = (
            f"Rate limit reached for tokens per min (TPM): Limit {key.tpm}, Used {key.tpm - max(0, int(level))}, "
            f"Requested {cost}. Please try again in {wait}."
        )
        code = "rate_limit_exceeded"
    return APIError(429, message, code=code, headers={**headers, "Retry-After": str(max(1, math.ceil(retry)))})
