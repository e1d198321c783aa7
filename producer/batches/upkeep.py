"""What a draining worker does besides batches: rq's registry maintenance, moving due retries onto
the queue, taking poison batches out of the way (`producer.batches.job.evict`), and counting failed the
batches deleted outside podembed."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence

from redis.exceptions import RedisError
from rq import Queue
from rq.registry import (
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ReadyJobRegistry,
    StartedJobRegistry,
)
from rq.scheduler import RQScheduler
from rq.scripts import RELEASE_LOCK_SCRIPT
from rq.timeouts import TimerDeathPenalty
from rq.worker_registration import clean_worker_registry

from producer.batches.job import load_batch
from producer.connections import run_script
from producer.jobs import JobRecords
from producer.operations import fail_deleted_batches

logger = logging.getLogger(__name__)

# How long a queue's maintenance lock lasts: a pass takes well under a second per queue, even a WAN away.
# rq's own lock lasts 899 s: a worker killed mid-pass (SIGKILL, a preempted container) held every other
# worker off the queue's cleanup, and so off the recovery of its batches, for 15 minutes. This one lapses
# no later than the dead worker's batch registrations (3 beats of 10 s).
MAINTENANCE_LOCK_SECONDS = 30
# One worker of the fleet at a time, at most this often, looks for batches deleted outside podembed.
DELETED_CHECK_SECONDS = 60
DELETED_CHECK_LOCK = "podembed:housekeeping:deleted-batches"


def guarded(step: Callable[[], object], suspects: Callable[[], Iterable[tuple[Queue, str]]], *, what: str,
            keep_seconds: int) -> None:
    """Run one of rq's maintenance steps; if a job it met broke it, evict the poison (each suspect
    that cannot be loaded from its queue) and run it again."""
    try:
        step()
        return
    except RedisError:
        raise
    except Exception as exc:
        logger.warning("%s failed (%s: %s); looking for jobs that cannot be loaded", what, type(exc).__name__, exc)
    for queue, batch_id in suspects():
        load_batch(queue, batch_id, keep_seconds=keep_seconds)
    try:
        step()
    except RedisError:
        raise
    except Exception:
        logger.exception("%s failed again; next pass tries once more", what)


def maintain(queue: Queue, worker: object, *, keep_seconds: int, every: float | None = None) -> bool:
    """rq's registry cleanup (abandoned batches retried, stuck intermediate entries failed), poison-proof;
    False if it did not run: another worker's pass holds the queue's maintenance lock, or (with `every`)
    a pass of the fleet ran on this queue less than `every` seconds ago.

    Every drain's housekeeper passes each maintenance interval; without `every` a fleet of N drains
    would run N passes per queue per interval, each a few dozen round trips. A drain's first pass
    goes without it: a drain started for abandoned batches recovers them at once.

    The maintenance lock (rq's key, so plain rq workers respect it) is released however the pass ends,
    and lapses in MAINTENANCE_LOCK_SECONDS if this process dies mid-pass.
    """
    redis = queue.connection
    if every is not None and not redis.set(recent_pass_key(queue), 1, nx=True, ex=max(1, round(every))):
        return False
    # rq 3.0.0: `Queue.registry_cleaning_key` is the lock rq's `Worker.clean_registries` takes (its own
    # `acquire_maintenance_lock` sets it for 899 s).
    if not redis.set(queue.registry_cleaning_key, 1, nx=True, ex=MAINTENANCE_LOCK_SECONDS):
        return False
    try:
        started = queue.started_job_registry
        guarded(lambda: clean_batch_registries(queue),
                lambda: ((queue, j) for j in started.get_job_ids(cleanup=False)),
                what=f"queue {queue.name}: registry cleanup", keep_seconds=keep_seconds)
        clean_worker_registry(queue)
        guarded(lambda: queue.intermediate_queue.cleanup(worker, queue),
                lambda: ((queue, j) for j in queue.intermediate_queue.get_job_ids()),
                what=f"queue {queue.name}: intermediate queue cleanup", keep_seconds=keep_seconds)
    finally:
        queue.release_maintenance_lock()
    return True


class StartedBatches(StartedJobRegistry):
    """rq's started registry, whose cleanup runs an abandoned batch's failure callback under a timer.

    rq's default (SIGALRM) can only be set from the main thread; the housekeeper is another, so
    rq logged "signal only works in main thread" and skipped the callback: an abandoned batch was
    retried without its job counting it retrying, and one with no retries left was never counted
    failed, so its job never ended.
    """

    death_penalty_class = TimerDeathPenalty


def clean_batch_registries(queue: Queue) -> None:
    """rq 3.0's `clean_registries`, with `StartedBatches` for the started registry."""
    for registry in (FinishedJobRegistry, StartedBatches, FailedJobRegistry, DeferredJobRegistry, ReadyJobRegistry):
        registry(name=queue.name, connection=queue.connection, job_class=queue.job_class,
                 serializer=queue.serializer).cleanup()


def recent_pass_key(queue: Queue) -> str:
    """Set for a maintenance interval by the fleet's periodic pass of `queue`."""
    return f"podembed:{queue.name}:maintained"


def fail_deleted_batches_of_open_jobs(records: JobRecords) -> None:
    """Count failed the batches of every open job whose rq job was deleted (rq-dashboard's Delete), so the
    job ends and its counts add up; at most once per DELETED_CHECK_SECONDS over all workers."""
    if not records.redis.set(DELETED_CHECK_LOCK, 1, nx=True, ex=DELETED_CHECK_SECONDS):
        return
    for job_id in records.open_jobs():
        fail_deleted_batches(records, job_id)


# rq reads the due retries and removes them in two steps: two threads of one worker (the fetch lane
# and the housekeeper hold the same scheduler lock) moving them at once would queue a retry twice.
_moving = threading.Lock()


def enqueue_due_retries(scheduler: RQScheduler, queues: Sequence[Queue], *, keep_seconds: int) -> None:
    """Move retries whose back-off has passed onto their queues, those whose scheduler lock this worker holds."""
    with _moving:
        held = scheduler.acquire_locks()
        if not held:
            return  # another worker's scheduler moves them
        mine = [q for q in queues if q.name in held]
        guarded(scheduler.enqueue_scheduled_jobs,
                lambda: ((q, j) for q in mine for j in q.scheduled_job_registry.get_jobs_to_schedule()),
                what=f"queues {', '.join(q.name for q in mine)}: moving due retries", keep_seconds=keep_seconds)


def scheduler_for(queues: Sequence[Queue], name: str) -> RQScheduler:
    """rq's scheduler of these queues, run in this process (no fork) by `enqueue_due_retries`."""
    # rq gives its scheduler's logger a stdout handler when it has none, which would mix log
    # lines into `--json` output; a null handler stops that, and records still reach the root's.
    rq_logger = logging.getLogger("rq.scheduler")
    if not rq_logger.handlers:
        rq_logger.addHandler(logging.NullHandler())
    first = queues[0]
    return RQScheduler(list(queues), connection=first.connection, serializer=first.serializer, name=name)


def release_locks(scheduler: RQScheduler) -> None:
    """rq's `release_locks` in one round trip (rq runs one script a lock, each an EVALSHA that Redis
    may answer NOSCRIPT first)."""
    with scheduler.connection.pipeline() as pipe:
        # rq 3.0.0: `RQScheduler.acquired_locks`, `get_locking_key` and `rq.scripts.RELEASE_LOCK_SCRIPT`
        # are what its `release_locks` uses; none has a public counterpart.
        for name in scheduler.acquired_locks:
            run_script(pipe, RELEASE_LOCK_SCRIPT, [scheduler.get_locking_key(name)], [scheduler.name])
        pipe.execute()
