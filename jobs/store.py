"""Files and batches in Redis (keys in shared.keys): what the gateway's /v1/files and /v1/batches read and write,
and what the arq batch runner works from. Nothing lives in process memory, so any gateway or arq process can
die and another carries on. The writes that must happen once per line are atomic Lua scripts."""

from __future__ import annotations

import json
import time
import uuid

import redis.asyncio as aioredis
from pydantic import BaseModel

from gateway.errors import APIError
from shared import keys

TERMINAL = ("completed", "failed", "expired", "cancelled")
BATCH_TIMESTAMPS = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
                    "cancelled_at")  # fmt: skip

# Put a line on its stream only if it was never put there: the dispatch mark and the XADD happen together.
_DISPATCH = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  for i = 3, #ARGV do redis.call('XADD', KEYS[2], '*', 'r', ARGV[i]) end
  return 1
end
return 0
"""
# Record a line's output once, and count it in the same step.
_RECORD = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
  return 1
end
return 0
"""
_REFRESH_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# Add an id to an owner's index (scored by the time now: creation seconds would tie), and keep the index as long as
# its longest-lived entry (EXPIRE's GT and NX options would need Redis 7; the rest of the service runs on 6.2).
_INDEX = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
if redis.call('TTL', KEYS[1]) < tonumber(ARGV[3]) then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return 1
"""
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


class FileRecord(BaseModel):
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    owner: str | None = None
    expires_at: int | None = None

    def view(self) -> dict:
        return {
            **self.model_dump(exclude={"owner"}),
            "object": "file",
            "status": "processed",
            "status_details": None,
        }


class BatchMeta(BaseModel):
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    created_at: int
    expires_at: int
    owner: str | None = None
    metadata: dict[str, str] | None = None
    trace_headers: dict[str, str] | None = None
    """The trace context of the request that created the batch: each line's spans are children of its span."""


class BatchState(BaseModel):
    meta: BatchMeta
    status: str
    total: int = 0
    completed: int = 0
    failed: int = 0
    cancel_requested: bool = False
    attempt: int = 0
    output_file_id: str | None = None
    timestamps: dict[str, int] = {}

    def view(self) -> dict:
        meta = self.meta
        return {
            "id": meta.id,
            "object": "batch",
            "endpoint": meta.endpoint,
            "errors": None,
            "input_file_id": meta.input_file_id,
            "completion_window": meta.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": None,
            "created_at": meta.created_at,
            "expires_at": meta.expires_at,
            **{name: self.timestamps.get(name) for name in BATCH_TIMESTAMPS},
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": meta.metadata,
        }


def _not_found(kind: str, name: str, ident: str) -> APIError:
    return APIError(404, f"No {kind} with id '{ident}'.", param=name, code=f"{kind}_not_found")


class BatchStore:
    """Needs a client with decode_responses=True."""

    def __init__(self, client: aioredis.Redis):
        self.redis = client
        self._dispatch = client.register_script(_DISPATCH)
        self._record = client.register_script(_RECORD)
        self._refresh = client.register_script(_REFRESH_LEASE)
        self._release = client.register_script(_RELEASE_LEASE)
        self._index_script = client.register_script(_INDEX)

    # -- files -------------------------------------------------------------------------------------------------
    async def put_file(
        self, content: str, filename: str, purpose: str, owner: str | None, ttl_s: int, file_id: str | None = None
    ) -> FileRecord:
        now = int(time.time())
        record = FileRecord(
            id=file_id or new_id("file-"),
            bytes=len(content.encode()),
            created_at=now,
            filename=filename,
            purpose=purpose,
            owner=owner,
            expires_at=now + ttl_s,
        )
        async with self.redis.pipeline(transaction=True) as pipe:
            await self._put_file(pipe, record, content, ttl_s)
            await pipe.execute()
        return record

    async def file(self, file_id: str, owner: str | None) -> FileRecord:
        body = await self.redis.get(keys.file(file_id))
        record = None if body is None else FileRecord.model_validate_json(body)
        if record is None or record.owner != owner:
            raise _not_found("file", "file_id", file_id)
        return record

    async def owner_files(self, owner: str | None, purpose: str | None, after: str | None, limit: int):
        """(Up to `limit` of the owner's files, newest first, from the one after `after`, of `purpose` if given;
        whether more follow)."""
        read = lambda pipe, file_id: pipe.get(keys.file(file_id))  # noqa: E731
        return await self._owned_page(
            keys.owner_files(owner), "file", after, limit, read, FileRecord.model_validate_json,
            lambda record: purpose in (None, record.purpose),
        )  # fmt: skip

    async def delete_file(self, file_id: str, owner: str | None) -> None:
        await self.file(file_id, owner)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.file(file_id), keys.file_content(file_id))
            pipe.zrem(keys.owner_files(owner), file_id)
            await pipe.execute()

    async def file_content(self, file_id: str, owner: str | None) -> str:
        await self.file(file_id, owner)
        content = await self.redis.get(keys.file_content(file_id))
        if content is None:
            raise _not_found("file", "file_id", file_id)
        return content

    async def _put_file(self, pipe, record: FileRecord, content: str, ttl_s: int) -> None:
        pipe.set(keys.file_content(record.id), content, ex=ttl_s)
        pipe.set(keys.file(record.id), record.model_dump_json(), ex=ttl_s)
        await self._index(pipe, keys.owner_files(record.owner), record.id, ttl_s)

    async def _index(self, pipe, index: str, ident: str, ttl_s: int) -> None:
        await self._index_script(keys=[index], args=[time.time(), ident, ttl_s], client=pipe)

    # -- batches: the gateway's side ---------------------------------------------------------------------------
    async def create_batch(self, meta: BatchMeta, ttl_s: int) -> BatchState:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.batch(meta.id), mapping={"meta": meta.model_dump_json(), "status": "validating"})
            pipe.expire(keys.batch(meta.id), ttl_s)
            pipe.sadd(keys.ACTIVE_BATCHES, meta.id)
            await self._index(pipe, keys.owner_batches(meta.owner), meta.id, ttl_s)
            await pipe.execute()
        return BatchState(meta=meta, status="validating")

    async def owner_batches(self, owner: str | None, after: str | None, limit: int) -> tuple[list[BatchState], bool]:
        """(Up to `limit` of the owner's batches, newest first, from the one after `after`; whether more follow)."""
        read = lambda pipe, batch_id: pipe.hgetall(keys.batch(batch_id))  # noqa: E731
        return await self._owned_page(keys.owner_batches(owner), "batch", after, limit, read, _state)

    async def _owned_page(self, index: str, kind: str, after: str | None, limit: int, read, parse, keep=None):
        """Records (`read(pipeline, id)`, then `parse`d) of an owner's index, newest first, from the id after
        `after`, those `keep` takes if given: up to `limit`, and whether more follow. Ids whose record expired leave
        the index as they are met."""
        start = 0
        if after is not None:
            rank = await self.redis.zrevrank(index, after)
            if rank is None:
                raise _not_found(kind, "after", after)
            start = rank + 1
        page = []
        while len(page) <= limit:  # one beyond the page tells whether more follow
            ids = await self.redis.zrevrange(index, start, start + limit)
            if not ids:
                break
            async with self.redis.pipeline(transaction=False) as pipe:
                for ident in ids:
                    read(pipe, ident)
                records = await pipe.execute()
            gone = [ident for ident, record in zip(ids, records) if not record]
            if gone:
                await self.redis.zrem(index, *gone)
            page += [r for r in map(parse, filter(None, records)) if keep is None or keep(r)]
            start += len(ids) - len(gone)
        return page[:limit], len(page) > limit

    async def batch(self, batch_id: str, owner: str | None = None, check_owner: bool = True) -> BatchState:
        fields = await self.redis.hgetall(keys.batch(batch_id))
        state = _state(fields) if fields else None
        if state is None or (check_owner and state.meta.owner != owner):
            raise _not_found("batch", "batch_id", batch_id)
        return state

    async def request_cancel(self, batch_id: str, owner: str | None) -> BatchState:
        state = await self.batch(batch_id, owner)
        if state.status not in TERMINAL and not state.cancel_requested:
            await self.redis.hset(
                keys.batch(batch_id), mapping={"cancel": "1", "status": "cancelling", "cancelling_at": int(time.time())}
            )
        return await self.batch(batch_id, owner)

    # -- batches: the runner's side ----------------------------------------------------------------------------
    async def acquire_lease(self, batch_id: str, token: str, ttl_s: float) -> bool:
        if not await self.redis.set(keys.batch_lease(batch_id), token, nx=True, px=int(ttl_s * 1000)):
            return False
        await self.redis.hincrby(keys.batch(batch_id), "attempt", 1)
        return True

    async def refresh_lease(self, batch_id: str, token: str, ttl_s: float) -> bool:
        return bool(await self._refresh(keys=[keys.batch_lease(batch_id)], args=[token, int(ttl_s * 1000)]))

    async def release_lease(self, batch_id: str, token: str) -> None:
        await self._release(keys=[keys.batch_lease(batch_id)], args=[token])

    async def lease_held(self, batch_id: str) -> bool:
        return bool(await self.redis.exists(keys.batch_lease(batch_id)))

    async def start(self, batch_id: str, total: int) -> None:
        fields = {"total": total}
        if (await self.redis.hget(keys.batch(batch_id), "status")) == "validating":
            fields |= {"status": "in_progress", "in_progress_at": int(time.time())}
        await self.redis.hset(keys.batch(batch_id), mapping=fields)

    async def progress(self, batch_id: str) -> tuple[set[int], dict[int, str]]:
        """Lines already recorded, and every dispatched line's request id."""
        done = await self.redis.hkeys(keys.batch_output(batch_id))
        dispatched = await self.redis.hgetall(keys.batch_dispatched(batch_id))
        return {int(i) for i in done}, {int(i): request_id for i, request_id in dispatched.items()}

    async def dispatch(self, batch_id: str, index: int, request_id: str, stream: str, payloads: list[str]) -> bool:
        """A line's requests (its prompts and choices) onto the stream, all or none, once."""
        return bool(
            await self._dispatch(keys=[keys.batch_dispatched(batch_id), stream], args=[index, request_id, *payloads])
        )

    async def record_line(self, batch_id: str, index: int, line: dict) -> bool:
        counter = "failed" if line.get("error") else "completed"
        return bool(
            await self._record(
                keys=[keys.batch_output(batch_id), keys.batch(batch_id)], args=[index, json.dumps(line), counter]
            )
        )

    async def finish(self, batch_id: str, status: str, owner: str | None, result_ttl_s: int, record_ttl_s: int) -> str:
        """Writes the output file (lines in input order) and the batch's final status, all in one transaction."""
        lines = await self.redis.hgetall(keys.batch_output(batch_id))
        content = "".join(lines[i] + "\n" for i in sorted(lines, key=int))
        now = int(time.time())
        output = FileRecord(
            id=f"file-{batch_id.removeprefix('batch_')}-output",
            bytes=len(content.encode()),
            created_at=now,
            filename=f"{batch_id}_output.jsonl",
            purpose="batch_output",
            owner=owner,
            expires_at=now + result_ttl_s,
        )
        async with self.redis.pipeline(transaction=True) as pipe:
            await self._put_file(pipe, output, content, result_ttl_s)
            pipe.hset(
                keys.batch(batch_id),
                mapping={"status": status, "output_file_id": output.id, f"{status}_at": now, "finalizing_at": now},
            )
            pipe.expire(keys.batch(batch_id), record_ttl_s)
            pipe.delete(keys.batch_output(batch_id), keys.batch_dispatched(batch_id))
            pipe.srem(keys.ACTIVE_BATCHES, batch_id)
            await pipe.execute()
        return output.id

    async def active(self) -> list[str]:
        return sorted(await self.redis.smembers(keys.ACTIVE_BATCHES))

    async def forget(self, batch_id: str) -> None:
        await self.redis.srem(keys.ACTIVE_BATCHES, batch_id)


def _state(fields: dict[str, str]) -> BatchState:
    return BatchState(
        meta=BatchMeta.model_validate_json(fields["meta"]),
        status=fields.get("status", "validating"),
        total=int(fields.get("total", 0)),
        completed=int(fields.get("completed", 0)),
        failed=int(fields.get("failed", 0)),
        cancel_requested=fields.get("cancel") == "1",
        attempt=int(fields.get("attempt", 0)),
        output_file_id=fields.get("output_file_id"),
        timestamps={name: int(fields[name]) for name in BATCH_TIMESTAMPS if name in fields},
    )
