"""What the producer, the fleet view and the launcher read and change of rq's queues and registries.

Reads are pipelined round trips over lengths, sorted-set ranges and a few hash fields, never a scan
of every batch. Redis errors are left to the caller, which names what it was reading.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from redis import Redis
from rq import Queue, Worker
from rq.exceptions import InvalidJobOperation
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import as_text

from producer.batches.job import batch_key, fetch_batch, fetch_batches

# rq's registries of a queue, by the state its batches are in there.
REGISTRIES = {"scheduled": "scheduled_job_registry", "started": "started_job_registry",
              "failed": "failed_job_registry", "deferred": "deferred_job_registry",
              "canceled": "canceled_job_registry"}


@dataclass
class QueueCounts:
    """One queue's batches by state (`queued` on the queue, the others in rq's registries of it), and the
    ISO time its head batch was enqueued (None: the queue is empty)."""

    batches: dict[str, int]
    head_enqueued_at: str | None


@dataclass
class Waiting:
    """A queue's batches a drain can take at a moment, and the retries due after it."""

    queued: list[str]
    due: list[str]  # retries whose back-off has passed
    abandoned: list[str]  # started, their worker's heartbeat lapsed
    later: list[float]  # the Unix times the other retries fall due


@dataclass
class WorkerRegistration:
    """A worker registered with rq, as its hash reads."""

    name: str
    state: str | None
    last_heartbeat: str | None
    current_batch: str | None


def count_batches(redis: Redis, queues: Sequence[Queue]) -> list[QueueCounts]:
    """Each queue's depth, its registries' sizes, and when its head was enqueued: two round trips."""
    with redis.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.llen(queue.key)
            for registry in REGISTRIES.values():
                pipe.zcard(getattr(queue, registry).key)
            pipe.lindex(queue.key, 0)
        answers = pipe.execute()
    step = len(REGISTRIES) + 2
    rows = [answers[i * step:(i + 1) * step] for i in range(len(queues))]
    heads = [head.decode() for *_, head in rows if head]
    with redis.pipeline(transaction=False) as pipe:
        for head in heads:
            pipe.hget(batch_key(head), "enqueued_at")
        enqueued_at = dict(zip(heads, pipe.execute(), strict=True))
    counts = []
    for depth, *sizes, head in rows:
        at = enqueued_at.get(head.decode()) if head else None
        counts.append(QueueCounts(batches={"queued": depth, **dict(zip(REGISTRIES, sizes, strict=True))},
                                  head_enqueued_at=at.decode() if at else None))
    return counts


def waiting_batches(queue: Queue, now: float) -> Waiting:
    """The batches of `queue` a drain can take at `now` (Unix time), and when the later retries fall due."""
    redis = queue.connection
    queued = queue.get_job_ids()
    with redis.pipeline() as pipe:
        pipe.zrange(queue.scheduled_job_registry.key, 0, -1, withscores=True)
        pipe.zrangebyscore(queue.started_job_registry.key, 0, now)
        scheduled, started = pipe.execute()
    # An entry is `batch_id:execution_id`; a batch may have two executions when a retry raced.
    abandoned = sorted({StartedJobRegistry.parse_job_id(as_text(entry)) for entry in started})
    return Waiting(queued=queued, due=[as_text(batch_id) for batch_id, at in scheduled if at <= now],
                   abandoned=abandoned, later=[at for _, at in scheduled if at > now])


def batch_metas(redis: Redis, batch_ids: Sequence[str]) -> list[dict]:
    """Each batch's meta as the producer wrote it ({}: none, or the batch is gone); one round trip."""
    with redis.pipeline() as pipe:
        for batch_id in batch_ids:
            pipe.hget(batch_key(batch_id), "meta")
        return [JSONSerializer.loads(raw) if raw else {} for raw in pipe.execute()]


def existing_batches(redis: Redis, batch_ids: Sequence[str]) -> list[bool]:
    """Whether each batch's hash is still there; one round trip."""
    with redis.pipeline(transaction=False) as pipe:
        for batch_id in batch_ids:
            pipe.exists(batch_key(batch_id))
        return [bool(n) for n in pipe.execute()]


def failed_batches(queue: Queue, batch_ids: Sequence[str]) -> list[str]:
    """Those of `batch_ids` in the queue's failed registry whose hashes are still there."""
    registry = queue.failed_job_registry
    return [batch.id for batch in fetch_batches(queue.connection, [b for b in batch_ids if b in registry])]


def requeue_failed(queue: Queue, batch_ids: Sequence[str]) -> list[str]:
    """Put failed batches back on the queue; those another requeue took meanwhile are left out."""
    registry = queue.failed_job_registry
    requeued = []
    for batch in fetch_batches(queue.connection, list(batch_ids)):
        try:
            registry.requeue(batch)
        except InvalidJobOperation:
            continue  # another retry requeued it meanwhile
        requeued.append(batch.id)
    return requeued


def cancel_waiting(queue: Queue, batch_id: str) -> dict | None:
    """Take the batch off the queue (or its retry schedule) and cancel it; its meta, or None when it
    was neither queued nor scheduled (running, ended or gone)."""
    # Off the queue (or the retry schedule) first: once removed, no worker can take it.
    if not (queue.remove(batch_id) or queue.scheduled_job_registry.remove(batch_id)):
        return None
    batch = fetch_batch(queue.connection, batch_id)
    batch.cancel()
    return batch.meta


def registered_workers(redis: Redis) -> list[WorkerRegistration]:
    """Every worker registered with rq, by name; one round trip after the set's."""
    # rq's set of workers holds their keys (`rq:worker:NAME`).
    keys = sorted(k.decode() for k in redis.smembers(Worker.redis_workers_keys))
    with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hmget(key, "state", "last_heartbeat", "current_job")
        fields = pipe.execute()
    return [WorkerRegistration(key.removeprefix(Worker.redis_worker_namespace_prefix), *(_text(v) for v in values))
            for key, values in zip(keys, fields, strict=True)]


def worker_keys(queues: Sequence[Queue]) -> set[str]:
    """The keys of the workers listening on any of `queues`, each once."""
    return {key for queue in queues for key in Worker.all_keys(queue.connection, queue)}


def _text(value: bytes | None) -> str | None:
    return value.decode() if value else None
