"""Every Redis key and stream llmfleet uses, in one place, so the protocol reads on one screen.

requests   XADD by a gateway, XREADGROUP by the workers of one model (group WORKER_GROUP).
           Entry field "r": a JSON `InferenceRequest`.
output     One stream per request, written by the worker that runs it: field "d" holds a JSON `TokenDelta`
           per step, and the last entry holds field "f", the JSON `FinalResult`. Any gateway can follow it.
result     The `FinalResult` again, as a plain key with a TTL, written once (SET NX) before the XACK.
cancel     Set by a gateway when the client goes away; the worker drops the request at its next step.
job        An async job's record (kind, the InferenceRequest, owner), written by the gateway that accepted it.
live       Sorted set per model: worker id -> time of its last heartbeat. Gateways count the recent ones.
api_key    Hash per API key id: name, limits, salt, salted hash of the secret, created, revoked. The secret
           itself is never stored. api_keys is the set of every id, for `llmfleet keys list`.
rpm        Sorted set per key id: one member per request admitted in the last minute (score: its time).
tpm        Hash per key id: the token bucket ("level", "at"); output tokens are charged into it as generated.
inflight   Sorted set per key id: request id -> time its lease lapses (so a crashed gateway leaks nothing).
"""

PREFIX = "llmfleet"
WORKER_GROUP = "workers"


def requests(model: str) -> str:
    return f"{PREFIX}:requests:{model}"


def output(request_id: str) -> str:
    return f"{PREFIX}:output:{request_id}"


def result(request_id: str) -> str:
    return f"{PREFIX}:result:{request_id}"


def cancel(request_id: str) -> str:
    return f"{PREFIX}:cancel:{request_id}"


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def live_workers(model: str) -> str:
    return f"{PREFIX}:live:{model}"


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
