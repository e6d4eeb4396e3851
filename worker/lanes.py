"""The model's request lanes, read in priority order (settings.scheduling_policy; shared.keys `requests`, `lanes`).

A worker with work in hand takes its new requests with READ: each lane's, most urgent first (its own stream's, which
hold priority 0's only, just before the 0 lane's), until its free slots are filled, so that a waiting request never
starts after a less urgent one queued beside it. A full worker, under scheduling_policy "priority", reads one
request more urgent than one it runs, for whose slot the scheduler preempts that one (Scheduler._preempt_for). An
idle worker whose last READ found nothing blocks on all the streams at once (Redis has no blocking read in a script;
what arrives then is ordered by the scheduler's waiting queue), and reads with READ again after: a lane that is new
since then is found within the block's 500 ms."""

from __future__ import annotations

READ = """
-- KEYS: the worker's own stream, the model's 0 lane, its lanes registry
-- ARGV: the workers' group, this worker's id, how many entries at most, and optionally a priority: then only the
--       streams more urgent than it are read (a full worker looking for a request to preempt for)
-- Returns {the lanes most urgent first, the entries read: {stream, id, {field, value, ...}}, ...}
-- The own stream holds priority 0's requests only (SUBMIT routes no other there): it is read just before the 0 lane.
local bound = tonumber(ARGV[4])
local lanes, streams, placed = {}, {}, false
local function read_if_urgent(stream, priority)
    if not bound or priority < bound then
        streams[#streams + 1] = stream
    end
end
local function lane(stream, priority)
    if not placed and priority >= 0 then
        read_if_urgent(KEYS[1], 0)
        placed = true
    end
    lanes[#lanes + 1] = stream
    read_if_urgent(stream, priority)
end
local registered = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
local zero = false
for i = 1, #registered, 2 do
    local priority = tonumber(registered[i + 1])
    if not zero and priority > 0 then
        lane(KEYS[2], 0)
        zero = true
    end
    lane(registered[i], priority)
end
if not zero then
    lane(KEYS[2], 0)
end
local left, read = tonumber(ARGV[3]), {}
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
