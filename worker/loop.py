"""The local worker: rq's SimpleWorker (no fork) in a process that loads the model once."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker
from rq.executions import Execution
from rq.job import Job
from rq.serializers import JSONSerializer

from config.errors import ForeignJobError, QueueError
from config.settings import Settings
from producer.connections import redis_client
from producer.enqueue import ON_FAILURE, TASK, vector_spec
from worker.tasks import WorkerContext, init_context

logger = logging.getLogger(__name__)


@dataclass
class DrainTally:
    """What one drain ran; `busy_seconds` adds up the compute seconds its batches report to the ledger."""

    batches: int = 0
    failed: int = 0
    embedded: int = 0
    skipped: int = 0
    busy_seconds: float = 0.0


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
    """A SimpleWorker that tallies its batches and takes no new batch once its deadline has passed.

    It also beats while a batch runs. rq's SimpleWorker cannot (the batch holds its only thread),
    so it registers each batch for the whole job timeout plus a minute: a worker killed mid-batch
    would leave the batch unclaimed for half an hour. With a beating thread the registration lasts
    three beats, and once it lapses any worker's maintenance pass hands the batch to RQ's retry
    (`StartedJobRegistry.cleanup`: abandoned jobs with retries left are retried, not failed).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadline: float | None = None  # time.monotonic() value
        self.tally = DrainTally()

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None):
        # Past the deadline the queue looks empty to this worker, so a burst loop ends there.
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return None
        return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)

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

    def execute_job(self, job: Job, queue: Queue) -> None:
        super().execute_job(job, queue)
        self.tally.batches += 1
        result = job.return_value()  # `worker.tasks.BatchResult.to_dict()`; None if the batch raised
        if result is None:
            self.tally.failed += 1
            return
        self.tally.embedded += result["embedded"]
        self.tally.skipped += result["skipped"]
        self.tally.busy_seconds += result["gpu_seconds"]


def make_worker(
    settings: Settings, redis: Redis | None = None, *, name: str | None = None
) -> tuple[DrainWorker, WorkerContext]:
    """A worker on the batch queue, with the model loaded before the first batch.

    `name` (default: host and pid) is what the ledger records as each batch's `worker`.
    """
    redis = redis or redis_client(settings)
    ctx = init_context(settings, redis)
    if name:
        ctx.name = name
    ctx.embedder(vector_spec(settings))
    # By name, so the worker builds the queue (and its registries' cleanup) with `BatchJob`.
    worker = DrainWorker([settings.queue_name], connection=redis, serializer=JSONSerializer, job_class=BatchJob,
                         name=ctx.name, job_monitoring_interval=settings.heartbeat_interval,
                         maintenance_interval=settings.maintenance_interval,
                         # An idle worker blocks on the queue for worker_ttl - 15 s before its next
                         # maintenance pass: keep that as short as the maintenance interval.
                         worker_ttl=settings.maintenance_interval + 15)
    return worker, ctx


def drain(worker: DrainWorker, *, time_budget_s: float | None = None) -> DrainTally:
    """Run batches until the queue is empty or the budget is spent (the batch in hand always finishes).

    A process may drain many times (a Modal container does, once per call): rq installs its
    own SIGINT/SIGTERM handlers for the loop, and the caller's are put back afterwards.
    """
    worker.tally = DrainTally()
    worker.deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # The scheduler moves retries whose back-off has passed back onto the queue.
        worker.work(burst=True, with_scheduler=True, logging_level=logging.getLevelName(logger.getEffectiveLevel()))
    finally:
        for sig, handler in handlers.items():
            if handler is not None:  # None: not set from Python, nothing to put back
                signal.signal(sig, handler)
    return worker.tally


def run_worker(settings: Settings, *, burst: bool, redis: Redis | None = None) -> bool:
    """Drain the queue (until it is empty with `burst`); True if any batch was processed."""
    try:
        worker, _ = make_worker(settings, redis)
        if burst:
            return drain(worker).batches > 0
        # The scheduler moves retries whose back-off has passed back onto the queue.
        return worker.work(burst=False, with_scheduler=True,
                           logging_level=logging.getLevelName(logger.getEffectiveLevel()))
    except RedisError as exc:
        # rq survives Redis going away between batches, not at a batch's end: the batch it held is
        # retried by the next worker (its heartbeats stop), once Redis is back.
        raise QueueError(f"worker stopped, Redis unreachable: {exc}") from exc
