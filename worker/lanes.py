"""The model's request lanes, read in priority order (settings.scheduling_policy; shared.keys `requests`, `lanes`).

A worker with work in hand takes its new requests with READ: its own stream's first, then each lane's, most urgent
first, until its free slots are filled, so that a waiting request never starts after a less urgent one queued
beside it. An idle worker whose last READ found nothing blocks on all of them at once (Redis has no blocking read
in a script; what arrives then is ordered by the scheduler's waiting queue), and reads with READ again after: a lane
that is new since then is found within the block's 500 ms."""

from __future__ import annotations

import json

from shared import keys

READ = """
-- KEYS: the worker's own stream, the model's 0 lane, its lanes registry
-- ARGV: the workers' group, this worker's id, how many entries at most
-- Returns {the lanes most urgent first, the entries read: {stream, id, {field, value, ...}}, ...}
local lanes, placed = {}, false
local registered = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
for i = 1, #registered, 2 do
    if not placed and tonumber(registered[i + 1]) > 0 then
        lanes[#lanes + 1] = KEYS[2]
        placed = true
    end
    lanes[#lanes + 1] = registered[i]
end
if not placed then
    lanes[#lanes + 1] = KEYS[2]
end
local left, read = tonumber(ARGV[3]), {}
local streams = {KEYS[1], unpack(lanes)}
for _, stream in ipairs(streams) do
    if left <= 0 then
        break
    end
    local read_one = {'XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', left, 'STREAMS', stream, '>'}
    local reply = redis.pcall(unpack(read_one))
    if type(reply) == 'table' and reply.err then
        -- A lane without its group (its stream deleted by hand): made again, as SUBMIT makes it.
        redis.call('XGROUP', 'CREATE', stream, ARGV[1], '0', 'MKSTREAM')
        reply = redis.call(unpack(read_one))
    end
    if reply then
        for _, entry in ipairs(reply[1][2]) do
            read[#read + 1] = {stream, entry[1], entry[2]}
            left = left - 1
        end
    end
end
return {lanes, read}
"""


def entries_by_stream(read: list) -> list[tuple[str, list[tuple[str, dict]]]]:
    """READ's entries in XREADGROUP's reply shape: [(stream, [(entry id, fields)])], streams in the order read."""
    grouped: dict[str, list[tuple[str, dict]]] = {}
    for stream, entry_id, flat in read:
        grouped.setdefault(stream, []).append((entry_id, dict(zip(flat[::2], flat[1::2]))))
    return list(grouped.items())


def lane_of(model: str, fields: dict) -> str:
    """The lane a stream entry's request belongs in (the 0 lane for one that cannot be read: its reader drops it)."""
    try:
        priority = json.loads(fields.get("r", "")).get("priority", 0)
    except (ValueError, AttributeError):
        priority = 0
    return keys.requests(model, priority if isinstance(priority, int) else 0)
