"""Async jobs: submit a chat or completion body, come back for the result through any gateway replica.

A job is an ordinary inference request on the stream plus a record (keys.job) that remembers what was asked,
so its status can be derived from what the worker wrote: a final record means it ended, output on its token
stream means it is running, neither means it is still queued (or, past its deadline, expired).

Retention: a result is shown for `result_ttl_s` after it was written; after that, and for
`jobs.expired_visible_s` more, the job reads `expired`. A job belongs to the API key that submitted it
(`request.state.key_id`, None in open mode); any other key gets a 404, as if it did not exist."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Mapping

from pydantic import BaseModel, Field

from gateway.api_keys import ApiKey
from gateway.completion_shapes import Kind, whole_response
from gateway.errors import APIError, failure, first_failure, validated
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.queue_client import GRACE_AFTER_DEADLINE_S
from gateway.serving import Completions
from shared import keys
from shared.protocol import FinalResult, InferenceRequest

_STATUS = {
    "stop": "completed",
    "length": "completed",
    "cancelled": "cancelled",
    "expired": "expired",
    "error": "failed",
}


IDEMPOTENCY_RACE_WAIT_S = 2.0


class JobRecord(BaseModel):
    kind: Kind
    request: InferenceRequest
    """The first prompt's first choice: its id is the job's."""
    others: list[InferenceRequest] = Field(default_factory=list)
    """The other choices and prompts, in the order of the response's choices."""
    owner: str | None = None
    """The id of the API key that submitted it (None in open mode)."""

    @property
    def requests(self) -> list[InferenceRequest]:
        return [self.request, *self.others]


def parse_body(body: object, kind: Kind | None = None) -> tuple[Kind, ChatCompletionRequest | CompletionRequest]:
    """A chat or completion body, validated as the synchronous endpoint would (kind guessed from `messages`)."""
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_value")
    kind = kind or ("chat" if "messages" in body else "text")
    model = ChatCompletionRequest if kind == "chat" else CompletionRequest
    return kind, validated(model, {**body, "stream": False})


class Jobs:
    def __init__(self, completions: Completions):
        self.completions = completions
        self.redis = completions.queue.redis
        settings = completions.settings
        self.result_ttl_s = settings.result_ttl_s
        # The record outlives the request's deadline and its result's retention, so that it can read `expired`.
        self.record_ttl_s = int(settings.request_timeout_s) + settings.result_ttl_s + settings.jobs.expired_visible_s

    async def submit(
        self,
        body: object,
        key: ApiKey | None,
        idempotency_key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> dict:
        """The new job's view; with an idempotency key already used by this owner, the earlier job's view."""
        owner = key.id if key else None
        kind, parsed = parse_body(body)
        requests = await self.completions.build_all(kind, parsed, headers)
        # Jobs stream deltas internally so that a running job is visible as running.
        request, *others = [r.model_copy(update={"stream": True}) for r in requests]
        if idempotency_key is not None:
            earlier = await self._claim_idempotency_key(owner, idempotency_key, body, request.id)
            if earlier is not None:
                return earlier
        record = JobRecord(kind=kind, request=request, others=others, owner=owner)
        await self.redis.set(keys.job(request.id), record.model_dump_json(), ex=self.record_ttl_s)
        try:
            await self.completions.enqueue(record.requests, key, followed=False)
        except BaseException:
            # Not accepted (limits, no live worker, full queue): a retry with the same key must be able to try again.
            await self.redis.delete(keys.job(request.id))
            if idempotency_key is not None:
                await self.redis.delete(keys.idempotency(owner, idempotency_key))
            raise
        return self._view(record, "queued", None)

    async def _claim_idempotency_key(self, owner: str | None, key: str, body: object, job_id: str) -> dict | None:
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]
        name = keys.idempotency(owner, key)
        if await self.redis.set(name, f"{job_id} {digest}", nx=True, ex=self.record_ttl_s):
            return None
        earlier_id, earlier_digest = (await self.redis.get(name) or " ").split(" ")
        if earlier_digest != digest:
            raise APIError(
                422,
                "This Idempotency-Key was already used with a different request body.",
                param="Idempotency-Key",
                code="idempotency_key_reused",
            )
        # The first submit may still be between claiming the key and writing its record.
        deadline = time.monotonic() + IDEMPOTENCY_RACE_WAIT_S
        while not await self.redis.exists(keys.job(earlier_id)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return await self.get(earlier_id, owner)

    async def get(self, job_id: str, owner: str | None) -> dict:
        record = await self._record(job_id, owner)
        finals = await self.completions.queue.results([r.id for r in record.requests])
        if None not in finals:
            if time.time() > finals[0].finished + self.result_ttl_s:
                return self._view(record, "expired", [])
            return self._view(record, _STATUS[(first_failure(finals) or finals[0]).finish_reason], finals)
        unended = [r for r, f in zip(record.requests, finals) if f is None]
        if await self.redis.exists(*(keys.output(r.id) for r in unended)):
            return self._view(record, "running", [])
        # Nothing written and past its deadline: it never ran in time, or its result has been dropped.
        if time.time() > record.request.deadline + GRACE_AFTER_DEADLINE_S:
            return self._view(record, "expired", [])
        return self._view(record, "running" if any(finals) else "queued", [])

    async def cancel(self, job_id: str, owner: str | None) -> dict:
        record = await self._record(job_id, owner)
        for request in record.requests:
            await self.completions.queue.cancel(request.id)
        return await self.get(job_id, owner)

    async def _record(self, job_id: str, owner: str | None) -> JobRecord:
        body = await self.redis.get(keys.job(job_id))
        record = None if body is None else JobRecord.model_validate_json(body)
        if record is None or record.owner != owner:
            raise APIError(404, f"No job with id '{job_id}'.", param="job_id", code="job_not_found")
        return record

    def _view(self, record: JobRecord, status: str, finals: list[FinalResult]) -> dict:
        request = record.request
        view = {
            "id": request.id,
            "object": "job",
            "status": status,
            "created_at": int(request.created),
            "completed_at": None,
            "result": None,
            "error": None,
        }
        if finals:
            view["completed_at"] = int(max(f.finished for f in finals))
            if status == "completed":
                view["result"] = whole_response(record.kind, record.requests, finals)
            else:
                view["error"] = failure(first_failure(finals)).body()["error"]
        return view
