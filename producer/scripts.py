"""The Lua scripts podembed runs in Redis, each with a header naming its KEYS and ARGV (as rq's `scripts.py`).

A script's ARGV is built from a named tuple (`TakeArgv`, `PutBackArgv`): the Lua reads its arguments into
locals of the same names, in the same order, at its top.
"""

from __future__ import annotations

from typing import NamedTuple

# rq-side scripts

# Takes the next batch from the queues in priority order (`producer.batches.take`).
# KEYS: the queues highest first, then their intermediate lists, then their scheduled registries (the same
#   order), then the backfill's share credit.
# ARGV: `TakeArgv`.
# The batch's hash is not among KEYS (its id is known only here): fine on a single Redis, which is all rq
# supports. Returns {index of the queue, batch id, the batch's hash as a flat list}, or, when every queue is
# empty, {-1, the earliest scheduled retry's score (false: none)}.
TAKE = """
local share, scale, hash_prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local n = (#KEYS - 1) / 3
local credit = KEYS[#KEYS]
local pick = 0
for i = 1, n do
  if redis.call('LLEN', KEYS[i]) > 0 then pick = i; break end
end
if pick == 0 then
  local due = false
  for i = 2 * n + 1, 3 * n do
    local first = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')[2]
    if first and (not due or tonumber(first) < tonumber(due)) then due = first end
  end
  return {-1, due}
end
if share > 0 and pick < n and redis.call('LLEN', KEYS[n]) > 0 then
  if redis.call('INCRBY', credit, share) >= scale then
    redis.call('DECRBY', credit, scale)
    pick = n
  end
end
local batch_id = redis.call('LMOVE', KEYS[pick], KEYS[n + pick], 'LEFT', 'RIGHT')
return {pick - 1, batch_id, redis.call('HGETALL', hash_prefix .. batch_id)}
"""


class TakeArgv(NamedTuple):
    share: int  # the backfill's share in `scale`ths (0: strict priority)
    scale: int  # what a whole share is worth
    hash_prefix: str  # the prefix of a batch's hash key (rq's job hash)


# Puts a batch that was taken but not started back on its queue (`producer.batches.lifecycle`).
# KEYS[1]: the queue.
# ARGV: `PutBackArgv`.
# Returns 1 when it went right behind `behind`, 0 when it went to the front.
PUT_BACK = """
local batch_id, behind = ARGV[1], ARGV[2]
if behind ~= '' and redis.call('LINSERT', KEYS[1], 'AFTER', behind, batch_id) > 0 then return 1 end
redis.call('LPUSH', KEYS[1], batch_id)
return 0
"""


class PutBackArgv(NamedTuple):
    batch_id: str
    # The batch put back earlier that this one goes right behind ("": none, or that one was taken again
    # since): then it goes to the front.
    behind: str
