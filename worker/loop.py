"""The local worker: a process that loads the model once and drains the queue through `worker.pipeline`."""

from __future__ import annotations

import logging

from redis import Redis
from redis.exceptions import RedisError

from config.errors import QueueError
from config.settings import Settings
from producer.batches.worker import DrainWorker, drain_worker
from producer.connections import open_connections, redis_client
from producer.enqueue import vector_spec
from worker.doctor import refuse_eviction
from worker.pipeline import REDIS_THREADS, DrainTally, run_drain
from worker.tasks import WorkerContext, current_context, init_context

logger = logging.getLogger(__name__)


def make_worker(
    settings: Settings, redis: Redis | None = None, *, name: str | None = None, ctx: WorkerContext | None = None
) -> tuple[DrainWorker, WorkerContext]:
    """A worker on the batch queue, with the model loaded before the first batch.

    `name` (default: host and pid) is what the ledger records as each batch's `worker`. `ctx`: the
    context its batches use (default: the process-wide one, built here).
    """
    redis = redis or redis_client(settings)
    refuse_eviction(settings, redis)  # before the model loads: a Redis that may evict the queue loses work
    ctx = ctx or init_context(settings, redis)
    if name:
        ctx.name = name
    ctx.embedder(vector_spec(settings))
    worker = drain_worker(redis, settings.queue_names(), name=ctx.name, heartbeat_interval=settings.heartbeat_interval,
                          maintenance_interval=settings.maintenance_interval)
    # Like the model, one connection per thread of a drain is made at start: a worker a WAN away from Redis
    # would pay a connect and a health check in each lane at its first drain.
    open_connections(redis, REDIS_THREADS)
    return worker, ctx


def drain(worker: DrainWorker, *, time_budget_s: float | None = None) -> DrainTally:
    """Run batches until the queue is empty, with no retry due within the budget, or the budget is spent.

    The pipelined loop of `worker.pipeline`; the batches on the model and being stored always finish.
    A process may drain many times (a Modal container does, once per call): the caller's signal
    handlers are put back afterwards.
    """
    return run_drain(worker, current_context(), time_budget_s=time_budget_s, burst=True)


def run_worker(settings: Settings, *, burst: bool, redis: Redis | None = None) -> bool:
    """Drain the queue (until it is empty with `burst`, else until a signal); True if any batch was processed."""
    try:
        worker, ctx = make_worker(settings, redis)
        return run_drain(worker, ctx, burst=burst).batches > 0
    except RedisError as exc:
        # A batch whose end could not be recorded is retried by the next worker (its heartbeats
        # stop), once Redis is back.
        raise QueueError(f"worker stopped, Redis unreachable: {exc}") from exc
