"""Every Redis key and stream llmfleet uses, in one place, so the protocol reads on one screen.

requests   XADD by a gateway, XREADGROUP by the workers of one model (group WORKER_GROUP).
           Entry field "r": a JSON `InferenceRequest`. With scheduling_policy "priority", one stream (lane) per
           priority value a request gave: the 0 lane is the stream every policy uses, the others are in `lanes`.
lanes      Sorted set per model: the stream of each priority lane other than 0 -> its priority (ZADD by the
           gateway's SUBMIT, which also makes the lane's group). Workers read the lanes in priority order.
worker_requests  The same, for one worker only: where the gateway routes a conversation's next turn (priority 0's
           only) when the worker that holds its prefix in cache is live and not full (affinity is a hint, never a
           trap).
affinity   Conversation key -> the worker that served its last turn (TTL), written by that worker.
load       Hash per model: worker id -> requests it is running or holding, written with its heartbeat.
batch_requests  The same, for batch lines (XADD by the arq batch runner): workers drain `requests` first and
           give batch work only the slots interactive traffic leaves free.
output     One stream per request, written by the worker that runs it: field "d" holds a JSON `TokenDelta`
           per step, and the last entry holds field "f", the JSON `FinalResult`. Any gateway can follow it.
result     The `FinalResult` again, as a plain key with a TTL, written once (SET NX) before the XACK.
cancel     Set by a gateway when the client goes away; the worker drops the request at its next step.
response   A stored Responses API response (JSON: its owner, the response, the conversation it ends), with a TTL.
job        An async job's record (kind, the InferenceRequest, owner), written by the gateway that accepted it.
idempotency  An Idempotency-Key (per owner) -> "job id body-hash", so a retried POST /v1/jobs returns the same job.
file       An uploaded or produced file's metadata (JSON); file_content holds its bytes.
batch      Hash: a batch's record ("meta" JSON), status, timestamps and progress counters (total/completed/failed).
batch_dispatched  Hash line index -> request id of every batch line put on a stream (HSETNX, with the XADD).
batch_output      Hash line index -> that line's output JSON (HSETNX: each line is written exactly once).
batch_lease       The running batch runner's token, with a short TTL it keeps refreshing; gone = runner dead.
active_batches    Set of batches not yet finished; the reclaim cron restarts those without a lease.
ARQ_QUEUE  The arq queue the job layer (python -m jobs) consumes; arq keeps its own keys under "arq:".
live       Sorted set per model: worker id -> time of its last heartbeat. Gateways count the recent ones.
finished   Counter per model and FINISHED_BUCKET_S-long time bucket: requests its workers ended then (INCR, with
           a TTL). Gateways read the recent drain rate from it to estimate how long a new request would queue.
dead       Dead-letter stream per model: requests delivered more than `delivery.max_deliveries` times (field
           "r" the request entry as it was, "reason", "deliveries"); each also ends `failed` in its result.
lora_adapters  Hash: name -> JSON `AdapterSource` of each LoRA adapter loaded at runtime (POST /v1/load_lora_adapter).
           Requests carry the entry; workers load it on first use and drop what is no longer in the hash.
api_key    Hash per API key id: name, limits, salt, salted hash of the secret, created, revoked. The secret
           itself is never stored. api_keys is the set of every id, for `llmfleet keys list`.
rpm        Sorted set per key id: one member per request admitted in the last minute (score: its time).
tpm        Hash per key id: the token bucket ("level", "at"); output tokens are charged into it as generated.
inflight   Sorted set per key id: request id -> time its lease lapses (so a crashed gateway leaks nothing).
"""

PREFIX = "llmfleet"
ARQ_QUEUE = f"{PREFIX}:arq:queue"
ACTIVE_BATCHES = f"{PREFIX}:batches:active"
WORKER_GROUP = "workers"


def requests(model: str, priority: int = 0) -> str:
    base = f"{PREFIX}:requests:{model}"
    return base if priority == 0 else f"{base}:priority:{priority}"


def lanes(model: str) -> str:
    return f"{PREFIX}:lanes:{model}"


def ordered_lanes(model: str, registered: list[tuple[str, float]]) -> list[str]:
    """Every request stream of `model` (the 0 lane and the `lanes` ZRANGE ... WITHSCORES reply), most urgent
    first: the lowest priority value, as vLLM orders them."""
    return [stream for stream, _ in sorted([(requests(model), 0.0), *registered], key=lambda lane: lane[1])]


def worker_requests(model: str, worker_id: str) -> str:
    return f"{PREFIX}:requests:{model}:worker:{worker_id}"


def affinity(model: str, conversation: str) -> str:
    return f"{PREFIX}:affinity:{model}:{conversation}"


def adoption_lock(model: str, worker_id: str) -> str:
    """Held by the live worker that moves a dead worker's own stream back to the shared one."""
    return f"{PREFIX}:adopting:{model}:{worker_id}"


def load(model: str) -> str:
    return f"{PREFIX}:load:{model}"


def output(request_id: str) -> str:
    return f"{PREFIX}:output:{request_id}"


def result(request_id: str) -> str:
    return f"{PREFIX}:result:{request_id}"


def cancel(request_id: str) -> str:
    return f"{PREFIX}:cancel:{request_id}"


def stored_response(response_id: str) -> str:
    return f"{PREFIX}:response:{response_id}"


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def live_workers(model: str) -> str:
    return f"{PREFIX}:live:{model}"


def finished(model: str, bucket: int) -> str:
    return f"{PREFIX}:finished:{model}:{bucket}"


def batch_requests(model: str) -> str:
    return f"{PREFIX}:batch-requests:{model}"


def idempotency(owner: str | None, key: str) -> str:
    return f"{PREFIX}:idempotency:{owner or '-'}:{key}"


def file(file_id: str) -> str:
    return f"{PREFIX}:file:{file_id}"


def file_content(file_id: str) -> str:
    return f"{PREFIX}:file-content:{file_id}"


def batch(batch_id: str) -> str:
    return f"{PREFIX}:batch:{batch_id}"


def owner_files(owner: str | None) -> str:
    """Sorted set: an owner's file ids by creation time, for GET /v1/files (None: open mode, no key)."""
    return f"{PREFIX}:files:by-owner:{owner or '-'}"


def owner_batches(owner: str | None) -> str:
    """Sorted set: an owner's batch ids by creation time, for GET /v1/batches (None: open mode, no key)."""
    return f"{PREFIX}:batches:by-owner:{owner or '-'}"


def batch_dispatched(batch_id: str) -> str:
    return f"{PREFIX}:batch-dispatched:{batch_id}"


def batch_output(batch_id: str) -> str:
    return f"{PREFIX}:batch-output:{batch_id}"


def batch_lease(batch_id: str) -> str:
    return f"{PREFIX}:batch-lease:{batch_id}"


def dead_letters(model: str) -> str:
    return f"{PREFIX}:dead:{model}"


def lora_adapters() -> str:
    return f"{PREFIX}:lora-adapters"


def api_key(key_id: str) -> str:
    return f"{PREFIX}:apikey:{key_id}"


def api_keys() -> str:
    return f"{PREFIX}:apikeys"


def rate_requests(key_id: str) -> str:
    return f"{PREFIX}:rpm:{key_id}"


def rate_tokens(key_id: str) -> str:
    return f"{PREFIX}:tpm:{key_id}"


def inflight(key_id: str) -> str:
    return f"{PREFIX}:inflight:{key_id}"
