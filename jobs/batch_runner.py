"""One batch, run by an arq job: its lines go onto the models' batch streams, at most `jobs.batch_in_flight` at
a time, their results come back from the workers, and each line's output is recorded exactly once.

Everything the run knows is in Redis (jobs.store): which lines were dispatched (marked in the same Lua step as
the XADD) and which were recorded (HSETNX). A run that dies — kill -9 of its arq process — loses nothing: its
lease lapses, the reclaim cron starts a new run, which follows the lines still in flight and dispatches the
rest. Workers stay the only place the model runs."""

from __future__ import annotations

import json
import time
import uuid
from collections import deque
from dataclasses import dataclass
from itertools import islice

import structlog

from gateway import embeddings, responses
from gateway.completion_shapes import Kind, whole_response
from gateway.embeddings import EmbeddingRequest
from gateway.errors import APIError, failure, first_failure, validated
from gateway.jobs import parse_body
from gateway.queue_client import GRACE_AFTER_DEADLINE_S
from gateway.responses import ResponsesRequest
from gateway.serving import Completions
from jobs.store import TERMINAL, BatchState, BatchStore
from shared import keys
from shared.protocol import FinalResult, InferenceRequest
from shared.settings import Settings

log = structlog.get_logger(__name__)

LEASE_TTL_S = 10.0
"""A run refreshes its lease at least every WAIT_MS; one whose lease lapsed this long is taken as dead."""
WAIT_MS = 1000
ENDPOINT_KINDS: dict[str, Kind] = {"/v1/chat/completions": "chat", "/v1/completions": "text", "/v1/responses": "chat"}
"""The response kind of each endpoint whose lines are chat or completion requests (not /v1/embeddings)."""


@dataclass
class Line:
    index: int
    custom_id: str | None
    kind: Kind | None
    requests: list[InferenceRequest]
    """One a prompt and choice, in the order of the response's choices (ids the batch's, so a new run of the batch
    finds them again)."""
    responses: ResponsesRequest | None = None
    """The line's body, in a batch of the Responses API (its response is written from it)."""
    embeddings: EmbeddingRequest | None = None
    """The line's body, in a batch of embeddings."""


class LineError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def output_line(batch_id: str, index: int, custom_id: str | None, response: dict | None, error: dict | None) -> dict:
    request_id = f"{batch_id}-{index}"
    body = None if response is None else {"status_code": 200, "request_id": request_id, "body": response}
    return {"id": f"batch_req_{request_id}", "custom_id": custom_id, "response": body, "error": error}


class BatchRun:
    def __init__(self, settings: Settings, store: BatchStore, completions: Completions, state: BatchState):
        self.settings = settings
        self.store = store
        self.completions = completions
        self.state = state
        self.id = state.meta.id
        self.token = uuid.uuid4().hex
        self.kind = ENDPOINT_KINDS.get(state.meta.endpoint)
        self.in_flight: dict[int, Line] = {}
        self.first_with_id: dict[str | None, int] = {}  # custom_id -> the first line that has it

    async def run(self) -> str:
        if not await self.store.acquire_lease(self.id, self.token, LEASE_TTL_S):
            return "another run holds the lease"
        try:
            return await self._run()
        finally:
            await self.store.release_lease(self.id, self.token)

    async def _run(self) -> str:
        meta = self.state.meta
        try:
            content = await self.store.file_content(meta.input_file_id, meta.owner)
        except APIError:
            content = ""
        lines = [raw for raw in content.splitlines() if raw.strip()]
        for index, raw in enumerate(lines):
            self.first_with_id.setdefault(_custom_id(raw), index)
        await self.store.start(self.id, len(lines))
        done, dispatched = await self.store.progress(self.id)
        for index in dispatched:
            if index not in done:
                line = await self._prepare_or_record(index, lines[index])
                if line is not None:
                    self.in_flight[index] = line
        pending = deque(i for i in range(len(lines)) if i not in done and i not in dispatched)
        log.info("batch.run", batch_id=self.id, lines=len(lines), done=len(done), in_flight=len(self.in_flight))
        ending: str | None = None  # "cancelled" or "expired" once the batch stops taking new lines
        while True:
            if not await self.store.refresh_lease(self.id, self.token, LEASE_TTL_S):
                return "lease lost"
            if ending is None:
                ending = await self._ending()
                if ending is not None:
                    await self._stop(pending, ending)
            while ending is None and pending and len(self.in_flight) < self.settings.jobs.batch_in_flight:
                await self._dispatch(pending.popleft(), lines)
            if not self.in_flight and not pending:
                break
            await self._collect()
        status = ending or "completed"
        settings = self.settings
        record_ttl_s = settings.result_ttl_s + settings.jobs.expired_visible_s
        await self.store.finish(self.id, status, meta.owner, settings.result_ttl_s, record_ttl_s)
        log.info("batch.finished", batch_id=self.id, status=status)
        return status

    async def _ending(self) -> str | None:
        state = await self.store.batch(self.id, check_owner=False)
        if state.cancel_requested:
            return "cancelled"
        if time.time() > state.meta.expires_at:
            return "expired"
        return None

    async def _stop(self, pending: deque[int], ending: str) -> None:
        """No new lines: the pending ones are recorded as not run, the running ones are cancelled."""
        code, message = f"batch_{ending}", f"The batch was {ending} before this line ran."
        while pending:
            index = pending.popleft()
            await self.store.record_line(self.id, index, output_line(self.id, index, None, None, _error(code, message)))
        for line in self.in_flight.values():
            for request in line.requests:
                await self.completions.queue.cancel(request.id)

    async def _prepare_or_record(self, index: int, raw: str) -> Line | None:
        try:
            return await self._prepare(index, raw)
        except LineError as error:
            custom_id = _custom_id(raw)
            line = output_line(self.id, index, custom_id, None, _error(error.code, error.message))
            await self.store.record_line(self.id, index, line)
            return None

    async def _prepare(self, index: int, raw: str) -> Line:
        try:
            item = json.loads(raw)
        except ValueError:
            raise LineError("invalid_json", f"Line {index + 1} is not valid JSON.") from None
        if not isinstance(item, dict):
            raise LineError("invalid_request", f"Line {index + 1} is not a JSON object.")
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise LineError("missing_custom_id", f"Line {index + 1} has no string 'custom_id'.")
        first = self.first_with_id.get(custom_id, index)
        if first != index:  # its output could not be told from the first one's
            raise LineError("duplicate_custom_id", f"Line {index + 1} repeats the custom_id of line {first + 1}.")
        if item.get("method", "POST") != "POST" or item.get("url") != self.state.meta.endpoint:
            endpoint = self.state.meta.endpoint
            raise LineError("invalid_url", f"Each line must be a POST to the batch's endpoint {endpoint}.")
        try:
            requests, asked, embedded = await self._requests(item.get("body"))
        except APIError as error:
            raise LineError(error.code or "invalid_request", error.message) from None
        # The line's index names its requests: the first `<batch>-<line>`, the later ones `-<place>` after it.
        ids = {r.id: f"{self.id}-{index}" + (f"-{place}" if place else "") for place, r in enumerate(requests)}
        deadline = float(self.state.meta.expires_at)
        requests = [
            r.model_copy(
                update={
                    "id": ids[r.id],
                    "choice_of": ids.get(r.choice_of),
                    "stream": False,
                    "deadline": deadline,
                    "batch": True,
                    "trace_headers": self.state.meta.trace_headers,
                }
            )  # fmt: skip
            for r in requests
        ]
        return Line(index, custom_id, self.kind, requests, asked, embedded)

    async def _requests(
        self, body: object
    ) -> tuple[list[InferenceRequest], ResponsesRequest | None, EmbeddingRequest | None]:
        """A line's body as the requests it becomes, with the body itself in a batch of the Responses API or of
        embeddings (their outputs are written from it); refused as the endpoint refuses it."""
        endpoint = self.state.meta.endpoint
        if endpoint == "/v1/embeddings":
            embedded = validated(EmbeddingRequest, body)
            return await self.completions.build_embeddings(embedded), None, embedded
        if endpoint == "/v1/responses":
            asked = validated(ResponsesRequest, body)
            if asked.previous_response_id:
                raise APIError(400, "A batch line cannot continue a stored response.", code="unsupported_value")
            chat = responses.chat_request(asked, responses.conversation(asked, []))
            return await self.completions.build_all(self.kind, chat), asked, None
        _, parsed = parse_body(body, self.kind)
        return await self.completions.build_all(self.kind, parsed), None, None

    async def _dispatch(self, index: int, lines: list[str]) -> None:
        line = await self._prepare_or_record(index, lines[index])
        if line is None:
            return
        first = line.requests[0]
        payloads = [r.model_dump_json() for r in line.requests]
        await self.store.dispatch(self.id, index, first.id, keys.batch_requests(first.model), payloads)
        self.in_flight[index] = line

    async def _collect(self) -> None:
        """Records every in-flight line that has ended; waits up to WAIT_MS for one if none has."""
        finished = await self._record_finished()
        if finished or not self.in_flight:
            return
        streams = {keys.output(r.id): "0-0" for line in self.in_flight.values() for r in line.requests}
        await self.store.redis.xread(streams, count=1, block=WAIT_MS)
        await self._record_finished()

    async def _record_finished(self) -> int:
        """Records the lines whose every request has ended (those past their deadline end expired)."""
        queue = self.completions.queue
        lines = list(self.in_flight.values())
        ended_so_far = iter(await queue.results([r.id for line in lines for r in line.requests]))
        finished = 0
        for line in lines:
            finals = list(islice(ended_so_far, len(line.requests)))
            if None in finals and time.time() <= line.requests[0].deadline + GRACE_AFTER_DEADLINE_S:
                continue
            ended = [f or await queue.expire(r) for r, f in zip(line.requests, finals)]
            await self.store.record_line(self.id, line.index, self._line_output(line, ended))
            del self.in_flight[line.index]
            finished += 1
        return finished

    def _line_output(self, line: Line, finals: list[FinalResult]) -> dict:
        failed = first_failure(finals)
        if failed is None:
            if line.embeddings is not None:
                response = embeddings.response(line.embeddings.model, finals, line.embeddings.encoding_format)
            elif line.responses is not None:
                response = responses.ResponseWriter(line.responses, line.requests[0]).response(finals[0])
            else:
                response = whole_response(line.kind, line.requests, finals)
            return output_line(self.id, line.index, line.custom_id, response, None)
        error = failure(failed)
        return output_line(self.id, line.index, line.custom_id, None, _error(error.code or "error", error.message))


def _error(code: str, message: str) -> dict:
    return {"code": code, "message": message}


def _custom_id(raw: str) -> str | None:
    try:
        item = json.loads(raw)
    except ValueError:
        return None
    custom_id = item.get("custom_id") if isinstance(item, dict) else None
    return custom_id if isinstance(custom_id, str) else None


async def run_batch(settings: Settings, store: BatchStore, completions: Completions, batch_id: str) -> str:
    try:
        state = await store.batch(batch_id, check_owner=False)
    except APIError:
        await store.forget(batch_id)
        return "gone"
    if state.status in TERMINAL:
        await store.forget(batch_id)
        return state.status
    return await BatchRun(settings, store, completions, state).run()
