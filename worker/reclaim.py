"""Taking over the requests of a worker that died: what the reclaiming worker needs to know about them.

A worker keeps the stream entries it runs fresh (OWN_OR_REPORT_LOST, every heartbeat); an entry left idle for
`delivery.reclaim_idle_s` belongs to a dead (or stalled) worker and is claimed with XAUTOCLAIM by a live one,
which resumes a streamed request from the tokens its output stream already holds."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.protocol import TokenDelta

OWN_OR_REPORT_LOST = """
local args = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
local owned = {}
for i = 3, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if pending[1] and pending[1][2] == ARGV[2] then
    owned[#owned + 1] = ARGV[i]
    args[#args + 1] = ARGV[i]
  end
end
if #owned > 0 then
  args[#args + 1] = 'JUSTID'
  redis.call(unpack(args))
end
return owned
"""
"""KEYS: the request stream; ARGV: group, consumer, entry ids. Resets the idle time of the entries the consumer
still owns (JUSTID: without counting a delivery) and returns them; the others were reclaimed by another
worker. A plain XCLAIM would take them back and run one request twice."""


@dataclass
class ResumePoint:
    token_ids: list[int] = field(default_factory=list)
    """The tokens a reader has seen, in order: first occurrence of each position, as the gateway relays them."""
    final: str | None = None
    """The final record the output stream already holds (JSON): nothing to run, only the entry to acknowledge and
    the result record to make sure of."""


def resume_point(output_entries: list[tuple[str, dict]]) -> ResumePoint:
    point = ResumePoint()
    for _, fields in output_entries:
        if "f" in fields:
            point.final = fields["f"]
            break
        delta = TokenDelta.model_validate_json(fields["d"])
        if delta.completion_tokens > len(point.token_ids):
            new = delta.completion_tokens - len(point.token_ids)
            if new > len(delta.token_ids):  # a gap: nothing after it can be trusted
                break
            point.token_ids += delta.token_ids[len(delta.token_ids) - new :]
    return point
