"""The rq worker whose bookkeeping the drain uses for each batch (and `work()` for a plain loop)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker
from rq.executions import Execution
from rq.job import Job
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty

from producer.batches.job import BatchJob

logger = logging.getLogger(__name__)

# What the drain holds of rq without touching it: a queue of batches, and the scheduler that moves due
# retries onto the queues (`producer.batches.upkeep`).
BatchQueue = Queue
RetryScheduler = RQScheduler


class DrainWorker(SimpleWorker):
    """The rq worker whose bookkeeping the drain uses for each batch (and `work()` for a plain loop).

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

    def batch_queues(self, names: Sequence[str]) -> list[BatchQueue]:
        """The queues `names` (highest priority first), read with this worker's serializer and job class."""
        return [Queue(name, connection=self.connection, serializer=self.serializer, job_class=self.job_class)
                for name in names]


def drain_worker(redis: Redis, queue_names: Sequence[str], *, name: str, heartbeat_interval: int,
                 maintenance_interval: int) -> DrainWorker:
    """A worker on the batch queues (highest priority first, so rq counts and shows it on each), built by
    name, so the worker builds the queues (and their registries' cleanup) with `BatchJob`."""
    return DrainWorker(list(queue_names), connection=redis, serializer=JSONSerializer, job_class=BatchJob,
                       name=name, job_monitoring_interval=heartbeat_interval,
                       maintenance_interval=maintenance_interval,
                       # An idle worker blocks on the queue for worker_ttl - 15 s before its next
                       # maintenance pass: keep that as short as the maintenance interval.
                       worker_ttl=maintenance_interval + 15)
