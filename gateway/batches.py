"""OpenAI's Files and Batch APIs: upload a JSONL of requests, create a batch over it, poll it, cancel it, read
its output. The gateway only records and reads (jobs.store); the arq process `python -m jobs` runs batches."""

from __future__ import annotations

import time

from arq.connections import ArqRedis
from starlette.datastructures import UploadFile

from gateway.errors import APIError
from gateway.protocol import BatchCreateRequest
from jobs.enqueue import enqueue_batch_run
from jobs.store import BatchMeta, BatchStore, new_id
from shared import tracing
from shared.settings import Settings

PURPOSES = ("batch",)


UPLOAD_PATH = "/v1/files"
UPLOAD_ENVELOPE_BYTES = 64 * 1024
"""What a file upload's body may carry beside the file (multipart boundaries, part headers, `purpose`): the
gateway's body limit on UPLOAD_PATH is `jobs.max_file_bytes` plus this, and the file itself is held to the setting."""


class Batches:
    def __init__(self, settings: Settings, store: BatchStore, arq: ArqRedis):
        self.settings = settings
        self.store = store
        self.arq = arq

    async def upload(self, upload: object, purpose: object, owner: str | None) -> dict:
        if not isinstance(upload, UploadFile):
            raise APIError(400, "A multipart field 'file' is required.", param="file", code="invalid_value")
        if purpose not in PURPOSES:
            raise APIError(400, f"'purpose' must be one of {list(PURPOSES)}.", param="purpose", code="invalid_value")
        limit = self.settings.jobs.max_file_bytes
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise APIError(413, f"The file is larger than {limit} bytes.", param="file", code="file_too_large")
        try:
            content = data.decode("utf-8")
        except UnicodeDecodeError:
            raise APIError(400, "The file must be UTF-8 JSONL.", param="file", code="invalid_file") from None
        lines = sum(1 for raw in content.splitlines() if raw.strip())
        limit = self.settings.jobs.max_batch_lines
        if lines > limit:
            raise APIError(400, f"At most {limit} lines.", param="file", code="too_many_lines")
        ttl_s = self.settings.jobs.batch_window_s + self.settings.result_ttl_s
        record = await self.store.put_file(content, upload.filename or "upload.jsonl", str(purpose), owner, ttl_s)
        return record.view()

    async def file(self, file_id: str, owner: str | None) -> dict:
        return (await self.store.file(file_id, owner)).view()

    async def file_content(self, file_id: str, owner: str | None) -> str:
        return await self.store.file_content(file_id, owner)

    async def list_files(self, owner: str | None, purpose: str | None, after: str | None, limit: int) -> dict:
        records, has_more = await self.store.owner_files(owner, purpose, after, limit)
        return _page([record.view() for record in records], has_more)

    async def delete_file(self, file_id: str, owner: str | None) -> dict:
        await self.store.delete_file(file_id, owner)
        return {"id": file_id, "object": "file", "deleted": True}

    async def create(self, body: BatchCreateRequest, owner: str | None) -> dict:
        source = await self.store.file(body.input_file_id, owner)
        if source.purpose != "batch":
            message = "The input file's purpose must be 'batch'."
            raise APIError(400, message, param="input_file_id", code="invalid_value")
        now = int(time.time())
        meta = BatchMeta(
            id=new_id("batch_"),
            endpoint=body.endpoint,
            input_file_id=body.input_file_id,
            completion_window=body.completion_window,
            created_at=now,
            expires_at=now + self.settings.jobs.batch_window_s,
            owner=owner,
            metadata=body.metadata,
            trace_headers=tracing.current_headers(),
        )
        ttl_s = self.settings.jobs.batch_window_s + self.settings.result_ttl_s + self.settings.jobs.expired_visible_s
        state = await self.store.create_batch(meta, ttl_s)
        # If this enqueue is lost (gateway dies here), the reclaim cron starts the batch instead.
        await enqueue_batch_run(self.arq, meta.id, 0)
        return state.view()

    async def get(self, batch_id: str, owner: str | None) -> dict:
        return (await self.store.batch(batch_id, owner)).view()

    async def list_batches(self, owner: str | None, after: str | None, limit: int) -> dict:
        states, has_more = await self.store.owner_batches(owner, after, limit)
        return _page([state.view() for state in states], has_more)

    async def cancel(self, batch_id: str, owner: str | None) -> dict:
        return (await self.store.request_cancel(batch_id, owner)).view()


def _page(data: list[dict], has_more: bool) -> dict:
    """OpenAI's list object, with its cursor fields."""
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": has_more}
