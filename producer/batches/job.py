"""The batch job class, and loading, evicting and reading batches.

A poison batch is a job hash rq cannot load (bad dates, missing fields, an unknown status).
rq raises on it wherever it meets it: at dequeue, in the intermediate queue, in the scheduled
and started registries. Left there, it stops every worker that comes along. Here it is taken
off every list and registry of the queue with one log line naming it; its hash is kept (with a
TTL) for inspection, and the worker goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.registry import BaseRegistry
from rq.serializers import JSONSerializer

from config.errors import ForeignJobError
from producer.enqueue import ON_FAILURE, TASK
from producer.models import BatchTicket

logger = logging.getLogger(__name__)


class BatchJob(Job):
    """An RQ job that resolves nothing but podembed's task and failure callback.

    The JSON serializer keeps pickles out, but a JSON job still names any importable callable
    (`os.system` and a shell command, say): whoever can write to Redis could run it here. rq
    resolves a job's function and callbacks only through these properties.
    """

    @property
    def func(self) -> Callable[..., Any]:
        if self.func_name != TASK:
            raise ForeignJobError(f"job {self.id}: refusing to run {self.func_name!r}, not a podembed task")
        return super().func

    # rq 3.0.0 keeps a callback's dotted name in `_failure_callback_name` (and `_success_`, `_stopped_`):
    # the only place to read it without resolving the callable.
    @property
    def failure_callback(self) -> Callable[..., Any] | None:
        self._refuse_callback("failure", self._failure_callback_name, ON_FAILURE)
        return super().failure_callback

    @property
    def success_callback(self) -> Callable[..., Any] | None:
        self._refuse_callback("success", self._success_callback_name)
        return super().success_callback

    @property
    def stopped_callback(self) -> Callable[..., Any] | None:
        self._refuse_callback("stopped", self._stopped_callback_name)
        return super().stopped_callback

    def _refuse_callback(self, kind: str, name: str | None, ours: str | None = None) -> None:
        if name and name != ours:
            raise ForeignJobError(f"job {self.id}: refusing {kind} callback {name!r}, not podembed's")


def batch_key(batch_id: str) -> str:
    """The Redis key of a batch's hash (rq's job hash)."""
    return Job.key_for(batch_id)


def fetch_batch(redis: Redis, batch_id: str) -> Job:
    """The batch's rq job; rq's `NoSuchJobError` if its hash is gone."""
    return Job.fetch(batch_id, connection=redis, serializer=JSONSerializer)


def fetch_batches(redis: Redis, batch_ids: list[str]) -> list[Job]:
    """The batches' rq jobs whose hashes are there, in the order given."""
    return [j for j in Job.fetch_many(batch_ids, connection=redis, serializer=JSONSerializer) if j is not None]


def read_ticket(batch: Job) -> BatchTicket:
    """What the batch's rq job carries; `BatchJob` refuses one naming anything but podembed's task."""
    batch.func  # noqa: B018
    return BatchTicket.from_payload(batch.args[0])


def load_batch(queue: Queue, batch_id: str, *, keep_seconds: int, raw: dict | None = None) -> Job | None:
    """The batch's rq job, or None if its hash is gone or it is poison (then it is evicted).

    `raw`: its hash, already read (by the take script); else it is read here.
    """
    try:
        if raw is None:
            return queue.job_class.fetch(batch_id, connection=queue.connection, serializer=queue.serializer)
        if not raw:
            return None
        batch = queue.job_class(batch_id, connection=queue.connection, serializer=queue.serializer)
        batch.restore(raw)
        return batch
    except NoSuchJobError:
        return None
    except RedisError:
        raise
    except Exception as exc:  # rq's restore raises whatever a malformed field makes it raise
        evict(queue, batch_id, exc, keep_seconds=keep_seconds)
        return None


def evict(queue: Queue, batch_id: str, exc: BaseException, *, keep_seconds: int) -> None:
    """Take a batch rq cannot load off the queue, its intermediate list and every registry."""
    registries: list[BaseRegistry] = [queue.scheduled_job_registry, queue.started_job_registry,
                                      queue.finished_job_registry, queue.failed_job_registry,
                                      queue.deferred_job_registry, queue.canceled_job_registry]
    redis = queue.connection
    with redis.pipeline() as pipe:
        pipe.lrem(queue.key, 0, batch_id)
        pipe.lrem(queue.intermediate_queue_key, 0, batch_id)
        for registry in registries:
            pipe.zrem(registry.key, batch_id)
        # The started registry holds `batch_id:execution_id` members.
        started = queue.started_job_registry
        for member in redis.zrange(started.key, 0, -1):
            if started.parse_job_id(member) == batch_id:
                pipe.zrem(started.key, member)
        pipe.expire(batch_key(batch_id), keep_seconds)
        pipe.execute()
    logger.error("queue %s: batch %s cannot be loaded (%s: %s); taken off the queue and its registries, "
                 "its hash kept %d s", queue.name, batch_id, type(exc).__name__, exc, keep_seconds)
