"""Async jobs: submit a chat or completion body, come back for the result through any gateway replica.

A job is an ordinary inference request on the stream plus a record (keys.job) that remembers what was asked,
so its status can be derived from what the worker wrote: a final record means it ended, output on its token
stream means it is running, neither means it is still queued.

A job belongs to the API key that submitted it: any other key gets the same 404 as for an id that does not
exist, so ids cannot be probed."""

from __future__ import annotations

from pydantic import BaseModel, ValidationError

from gateway.api_keys import ApiKey
from gateway.errors import APIError
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.serving import Completions, Kind, failure, whole_response
from shared import keys
from shared.protocol import FinalResult, InferenceRequest

_STATUS = {
    "stop": "completed",
    "length": "completed",
    "cancelled": "cancelled",
    "expired": "expired",
    "error": "failed",
}


class JobRecord(BaseModel):
    kind: Kind
    request: InferenceRequest
    owner: str | None = None
    """The id of the API key that submitted it (None in open mode)."""


def parse_body(body: object) -> tuple[Kind, ChatCompletionRequest | CompletionRequest]:
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_value")
    kind: Kind = "chat" if "messages" in body else "text"
    model = ChatCompletionRequest if kind == "chat" else CompletionRequest
    try:
        return kind, model.model_validate({**body, "stream": False})
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"{first['msg']}: '{param}'", param=param, code="invalid_value") from None


class Jobs:
    def __init__(self, completions: Completions):
        self.completions = completions
        self.redis = completions.queue.redis
        self.ttl_s = completions.settings.result_ttl_s

    async def submit(self, body: object, key: ApiKey | None) -> dict:
        kind, parsed = parse_body(body)
        request = self.completions.build(kind, parsed)
        # Jobs stream deltas internally so that a running job is visible as running.
        request = request.model_copy(update={"stream": True})
        record = JobRecord(kind=kind, request=request, owner=key.id if key else None)
        # Written before queueing so that a fast worker's result always has its record; a job refused by
        # the limits or the queue leaves none.
        await self.redis.set(keys.job(request.id), record.model_dump_json(), ex=self.ttl_s)
        try:
            # No connection waits on a job, so it holds no concurrency slot; it counts against rpm and tpm.
            await self.completions.enqueue(request, key, hold_slot=False)
        except BaseException:
            await self.redis.delete(keys.job(request.id))
            raise
        return self._view(record, "queued", None)

    async def get(self, job_id: str, key_id: str | None) -> dict:
        record = await self._record(job_id, key_id)
        final = await self.completions.queue.result(job_id)
        if final is not None:
            return self._view(record, _STATUS[final.finish_reason], final)
        started = await self.redis.exists(keys.output(job_id))
        return self._view(record, "running" if started else "queued", None)

    async def cancel(self, job_id: str, key_id: str | None) -> dict:
        await self._record(job_id, key_id)
        await self.completions.queue.cancel(job_id)
        return await self.get(job_id, key_id)

    async def _record(self, job_id: str, key_id: str | None) -> JobRecord:
        body = await self.redis.get(keys.job(job_id))
        record = None if body is None else JobRecord.model_validate_json(body)
        if record is None or record.owner != key_id:
            raise APIError(404, f"No job with id '{job_id}'.", param="job_id", code="job_not_found")
        return record

    def _view(self, record: JobRecord, status: str, final: FinalResult | None) -> dict:
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
        if final is not None:
            view["completed_at"] = int(final.finished)
            if status == "completed":
                view["result"] = whole_response(record.kind, request, final)
            else:
                view["error"] = failure(final).body()["error"]
        return view
