"""The next batch from the queues in priority order, with the backfill's optional share, in one round trip.

The queues are taken highest first (ingest, nightly, backfill: `Settings.queue_names`): a batch
goes to a worker from the first queue that holds one. With a backfill share, while the backfill
and a higher queue both wait, every take adds the share to a credit kept in Redis (one for all
workers, so the share holds across the fleet); a take that brings the credit to one takes from
the backfill instead and pays one back. So with a share of 0.2, every fifth batch taken under
contention is a backfill batch, and none is while the backfill waits alone or not at all.

The script (`producer.scripts.TAKE`) moves the batch's id into its queue's intermediate list, as
rq's own dequeue (`LMOVE`) does, and returns the batch's hash with it, so loading the batch costs no
round trip. When every queue is empty it answers when the earliest scheduled retry falls due, so a
drain knows whether to wait for more without another round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from redis import Redis
from rq import Queue
from rq.job import Job

from producer.connections import run_script
from producer.scripts import TAKE, ordered

# Integer credit (shares in millionths): a float counter would drift from exact fifths.
SHARE_SCALE = 1_000_000


@dataclass
class Idle:
    """Every queue was empty; `due`: the Unix time the earliest scheduled retry falls due (None: no retry)."""

    due: float | None


@dataclass
class Taken:
    """A batch id moved to its queue's intermediate list, with the batch's hash as read then ({}: gone)."""

    queue: Queue
    batch_id: str
    raw: dict[bytes, bytes]


class PriorityTake:
    """Takes the next batch id from `queues` (highest first); the last one is the backfill's."""

    def __init__(self, redis: Redis, queues: Sequence[Queue], share: float | None) -> None:
        self.queues = list(queues)
        # Its KEYS are as many as the queues: passed as a list, its ARGV by name.
        self.argv = ordered(TAKE.argv, {"share": 0 if share is None else round(share * SHARE_SCALE),
                                        "scale": SHARE_SCALE, "hash_prefix": Job.redis_job_namespace_prefix})
        backfill = self.queues[-1]
        self.keys = [q.key for q in self.queues] + [q.intermediate_queue_key for q in self.queues] \
            + [q.scheduled_job_registry.key for q in self.queues] + [credit_key(backfill.name)]
        self.redis = redis

    def __call__(self) -> Taken | Idle:
        """One round trip."""
        answer = run_script(self.redis, TAKE.source, self.keys, self.argv)
        if answer[0] == -1:
            return Idle(None if answer[1] is None else float(answer[1]))
        index, batch_id, flat = answer
        batch_id = batch_id.decode() if isinstance(batch_id, bytes) else batch_id
        return Taken(self.queues[index], batch_id, dict(zip(flat[::2], flat[1::2], strict=True)))


def credit_key(backfill_queue: str) -> str:
    """The Redis key of the backfill's share credit."""
    return f"podembed:{backfill_queue}:share-credit"
