"""Every Redis key and stream llmfleet uses, in one place, so the protocol reads on one screen.

requests   XADD by a gateway, XREADGROUP by the workers of one model (group WORKER_GROUP).
           Entry field "r": a JSON `InferenceRequest`.
worker_requests  The same, for one worker only: where the gateway routes a conversation's next turn when the
           worker that holds its prefix in cache is live and not full (affinity is a hint, never a trap).
affinity   Conversation key -> the worker that served its last turn (TTL), written by that worker.
load       Hash per model: worker id -> requests it is running or holding, written with its heartbeat.
output     One stream per request, written by the worker that runs it: field "d" holds a JSON `TokenDelta`
           per step, and the last entry holds field "f", the JSON `FinalResult`. Any gateway can follow it.
result     The `FinalResult` again, as a plain key with a TTL, written once (SET NX) before the XACK.
cancel     Set by a gateway when the client goes away; the worker drops the request at its next step.
job        An async job's record (kind, the InferenceRequest, owner), written by the gateway that accepted it.
live       Sorted set per model: worker id -> time of its last heartbeat. Gateways count the recent ones.
"""

PREFIX = "llmfleet"
WORKER_GROUP = "workers"


def requests(model: str) -> str:
    return f"{PREFIX}:requests:{model}"


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


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def live_workers(model: str) -> str:
    return f"{PREFIX}:live:{model}"
