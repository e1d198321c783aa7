"""The local worker: a process that loads the model once and drains the queue through `worker.pipeline`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker
from rq.executions import Execution
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty

from config.errors import ForeignJobError, QueueError
from config.settings import Settings
from producer.connections import open_connections, redis_client
from producer.enqueue import ON_FAILURE, TASK, vector_spec
from worker.doctor import refuse_eviction
from worker.pipeline import REDIS_THREADS, DrainTally, run_drain
from worker.tasks import WorkerContext, current_context, init_context

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


class DrainWorker(SimpleWorker):
    """The rq worker whose bookkeeping `worker.pipeline` uses for each batch (and `work()` for a plain loop).

    It beats while a batch runs. rq's SimpleWorker cannot (the batch holds its only thread),
    so it registers each batch for the whole job timeout plus a minute: a worker killed mid-batch
    would leave the batch unclaimed for half an hour. With beats the registration lasts three
    beats, and once it lapses any worker's maintenance pass hands the batch to RQ's retry
    (`StartedJobRegistry.cleanup`: abandoned jobs with retries left are retried, not failed).
    """

    # Failure callbacks run in the pipeline's lane threads, where SIGALRM timeouts cannot be set.
    death_penalty_class = TimerDeathPenalty

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return 3 * self.job_monitoring_interval

    def perform_job(self, job: Job, queue: Queue, execution: Execution) -> bool:
        stop = threading.Event()
        beating = threading.Thread(target=self._beat, args=(job, execution, stop), name="heartbeat", daemon=True)
        beating.start()
        try:
            return super().perform_job(job, queue, execution)
        finally:
            stop.set()
            beating.join()

    def _beat(self, job: Job, execution: Execution, stop: threading.Event) -> None:
        while not stop.wait(self.job_monitoring_interval):
            try:
                self.maintain_heartbeats(job, execution)
            except RedisError as exc:  # Redis away for a moment: the next beat tries again
                logger.warning("worker %s: heartbeat for batch %s failed: %s", self.name, job.id, exc)


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
    # By name, so the worker builds the queues (and their registries' cleanup) with `BatchJob`; all three,
    # highest priority first, so rq counts and shows the worker on each.
    worker = DrainWorker(list(settings.queue_names()), connection=redis, serializer=JSONSerializer,
                         job_class=BatchJob, name=ctx.name, job_monitoring_interval=settings.heartbeat_interval,
                         maintenance_interval=settings.maintenance_interval,
                         # An idle worker blocks on the queue for worker_ttl - 15 s before its next
                         # maintenance pass: keep that as short as the maintenance interval.
                         worker_ttl=settings.maintenance_interval + 15)
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
