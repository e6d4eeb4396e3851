"""Every Redis key and stream llmfleet uses, in one place, so the protocol reads on one screen.

requests   XADD by a gateway, XREADGROUP by the workers of one model (group WORKER_GROUP).
           Entry field "r": a JSON `InferenceRequest`.
output     One stream per request, written by the worker that runs it: field "d" holds a JSON `TokenDelta`
           per step, and the last entry holds field "f", the JSON `FinalResult`. Any gateway can follow it.
result     The `FinalResult` again, as a plain key with a TTL, written once (SET NX) before the XACK.
cancel     Set by a gateway when the client goes away; the worker drops the request at its next step.
job        An async job's record (kind, the InferenceRequest, owner), written by the gateway that accepted it.
live       Sorted set per model: worker id -> time of its last heartbeat. Gateways count the recent ones.
dead       Dead-letter stream per model: requests delivered more than `delivery.max_deliveries` times (field
           "r" the request entry as it was, "reason", "deliveries"); each also ends `failed` in its result.
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


def dead_letters(model: str) -> str:
    return f"{PREFIX}:dead:{model}"
