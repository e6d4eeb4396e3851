"""Stored responses of the Responses API: what `previous_response_id` continues, and what GET and DELETE
/v1/responses/{id} read. One Redis key a response, with a TTL, readable only with the API key that created it."""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from gateway.errors import APIError
from shared import keys


class ResponseStore:
    def __init__(self, client: aioredis.Redis, ttl_s: int):
        self.redis = client
        self.ttl_s = ttl_s

    async def save(self, response: dict, conversation: list[dict], inputs: list[dict], owner: str | None) -> None:
        """`conversation`: the messages up to and with the response's output, without its instructions (as OpenAI,
        a later response's instructions replace them); `inputs`: the request's own input items."""
        record = {"owner": owner, "response": response, "conversation": conversation, "inputs": inputs}
        await self.redis.set(keys.stored_response(response["id"]), json.dumps(record), ex=self.ttl_s)

    async def _record(self, response_id: str, owner: str | None, param: str | None = None) -> dict:
        body = await self.redis.get(keys.stored_response(response_id))
        record = json.loads(body) if body else None
        if record is None or record["owner"] != owner:
            raise APIError(404, f"No response with id '{response_id}' is stored.", param=param, code="not_found")
        return record

    async def response(self, response_id: str, owner: str | None) -> dict:
        return (await self._record(response_id, owner))["response"]

    async def conversation(self, response_id: str, owner: str | None) -> list[dict]:
        return (await self._record(response_id, owner, param="previous_response_id"))["conversation"]

    async def input_items(self, response_id: str, owner: str | None, after: str | None, limit: int, order: str) -> dict:
        """A page of the response's input items, newest first unless `order` is "asc" (OpenAI's cursor list)."""
        items = (await self._record(response_id, owner))["inputs"]
        items = items if order == "asc" else items[::-1]
        if after is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise APIError(404, f"No input item with id '{after}'.", param="after", code="not_found")
            items = items[ids.index(after) + 1 :]
        page = items[:limit]
        first, last = (page[0]["id"], page[-1]["id"]) if page else (None, None)
        return {"object": "list", "data": page, "first_id": first, "last_id": last, "has_more": len(items) > limit}

    async def delete(self, response_id: str, owner: str | None) -> dict:
        await self._record(response_id, owner)
        await self.redis.delete(keys.stored_response(response_id))
        return {"id": response_id, "object": "response", "deleted": True}
