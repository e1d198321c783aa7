"""The next batch from the queues in priority order, with the backfill's optional share, in one round trip.

The queues are taken highest first (ingest, nightly, backfill: `Settings.queue_names`): a batch
goes to a worker from the first queue that holds one. With a backfill share, while the backfill
and a higher queue both wait, every take adds the share to a credit kept in Redis (one for all
workers, so the share holds across the fleet); a take that brings the credit to one takes from
the backfill instead and pays one back. So with a share of 0.2, every fifth batch taken under
contention is a backfill batch, and none is while the backfill waits alone or not at all.

The script moves the batch's id into its queue's intermediate list, as rq's own dequeue
(`LMOVE`) does, and returns the job's hash with it, so loading the job costs no round trip.
When every queue is empty it answers when the earliest scheduled retry falls due, so a drain
knows whether to wait for more without another round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from redis import Redis
from rq import Queue
from rq.job import Job

from producer.connections import run_script

# Integer credit (shares in millionths): a float counter would drift from exact fifths.
SHARE_SCALE = 1_000_000

# KEYS: the queues highest first, then their intermediate lists, then their scheduled registries (the
# same order), then the credit. ARGV: the share in millionths (0: strict priority), SHARE_SCALE, the prefix
# of job hash keys. The job hash is not among KEYS (its id is known only here): fine on a single Redis,
# which is all rq supports. Returns {index of the queue, job id, the job's hash as a flat list}, or, when
# every queue is empty, {-1, the earliest scheduled retry's score (false: none)}.
_TAKE = """
local n = (#KEYS - 1) / 3
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
local share = tonumber(ARGV[1])
if share > 0 and pick < n and redis.call('LLEN', KEYS[n]) > 0 then
  if redis.call('INCRBY', KEYS[#KEYS], share) >= tonumber(ARGV[2]) then
    redis.call('DECRBY', KEYS[#KEYS], ARGV[2])
    pick = n
  end
end
local job_id = redis.call('LMOVE', KEYS[pick], KEYS[n + pick], 'LEFT', 'RIGHT')
return {pick - 1, job_id, redis.call('HGETALL', ARGV[3] .. job_id)}
"""


@dataclass
class Idle:
    """Every queue was empty; `due`: the Unix time the earliest scheduled retry falls due (None: no retry)."""

    due: float | None


@dataclass
class Taken:
    """A batch id moved to its queue's intermediate list, with the job's hash as read then ({}: gone)."""

    queue: Queue
    job_id: str
    raw: dict[bytes, bytes]


class PriorityTake:
    """Takes the next batch id from `queues` (highest first); the last one is the backfill's."""

    def __init__(self, redis: Redis, queues: Sequence[Queue], share: float | None) -> None:
        self.queues = list(queues)
        self.share = 0 if share is None else round(share * SHARE_SCALE)
        backfill = self.queues[-1]
        self.keys = [q.key for q in self.queues] + [q.intermediate_queue_key for q in self.queues] \
            + [q.scheduled_job_registry.key for q in self.queues] + [credit_key(backfill.name)]
        self.redis = redis

    def __call__(self) -> Taken | Idle:
        """One round trip."""
        answer = run_script(self.redis, _TAKE, self.keys, [self.share, SHARE_SCALE, Job.redis_job_namespace_prefix])
        if answer[0] == -1:
            return Idle(None if answer[1] is None else float(answer[1]))
        index, job_id, flat = answer
        job_id = job_id.decode() if isinstance(job_id, bytes) else job_id
        return Taken(self.queues[index], job_id, dict(zip(flat[::2], flat[1::2], strict=True)))


def credit_key(backfill_queue: str) -> str:
    """The Redis key of the backfill's share credit."""
    return f"podembed:{backfill_queue}:share-credit"
