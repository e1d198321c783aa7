"""A taken batch's life in rq: registered as started and claimed for its job, then finished, failed or
put back, beating meanwhile. `worker.pipeline` decides when; these functions say what rq records.

rq's own worker does these steps in `prepare_job_execution`, `handle_job_success`, `handle_job_failure`
and `maintain_heartbeats`, one batch at a time in its only thread. The drain holds several batches at
once in several threads, so it records each step itself, batched into pipelines, with the rq 3.0.0
calls those methods make.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

from redis.client import Pipeline
from rq import Queue
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.utils import now
from rq.worker import WorkerStatus

from producer.batches.job import load_batch, read_ticket
from producer.batches.take import Taken
from producer.batches.worker import DrainWorker
from producer.jobs import JobRecords
from producer.models import BatchTicket
from producer.scripts import PUT_BACK

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


@dataclass
class Registered:
    """A batch this worker took off the queue: registered as started, beating until it ends."""

    rq_job: Job  # the batch as rq holds it
    execution: Execution
    queue: Queue  # the queue it came from, where rq's finish, failure and retry put it
    ticket: BatchTicket | None  # None: its payload does not parse (the prepare stage fails it, saying why)
    claimed: object  # the answer to its claim, sent with its registration
    taken: int  # how many batches the drain had taken before it: the order a put back keeps

    @property
    def batch_id(self) -> str:
        return self.rq_job.id


R = TypeVar("R", bound=Registered)


def load_taken(taken: Taken, *, keep_seconds: int) -> Job | None:
    """The taken batch's rq job; None (and its id off the intermediate list) if it is gone or poison."""
    queue = taken.queue
    rq_job = load_batch(queue, taken.batch_id, keep_seconds=keep_seconds, raw=taken.raw)
    if rq_job is None:
        queue.connection.lrem(queue.intermediate_queue_key, 1, taken.batch_id)  # gone, or poison (evicted)
    return rq_job


def register(worker: DrainWorker, queue: Queue, rq_job: Job, records: JobRecords, *, taken: int,
             kind: type[R]) -> R:
    """Register the batch as started by `worker` and claim it for its job: one round trip. The worker's
    own hash is not touched (a drain's first take runs while the worker registers). `kind`: the record the
    caller keeps, `Registered` or a subclass whose other fields have defaults."""
    ttl = worker.get_heartbeat_ttl(rq_job)
    try:
        ticket: BatchTicket | None = read_ticket(rq_job)
    except Exception:  # whatever a foreign payload raises: the prepare stage raises it again
        ticket = None
    with queue.connection.pipeline() as pipe:
        # rq 3.0.0: `Execution.create` is how `Worker.prepare_execution` registers an execution.
        execution = Execution.create(rq_job, ttl, pipeline=pipe, worker_name=worker.name)
        rq_job.heartbeat(now(), ttl, pipeline=pipe)
        rq_job.prepare_for_execution(worker.name, pipeline=pipe)
        pipe.persist(rq_job.key)
        pipe.lrem(queue.intermediate_queue_key, 1, rq_job.id)
        # rq's maintenance marks a batch it sees in the intermediate list between a take and this
        # registration, and fails it as stuck if it sees it there again a minute later (a retry, or
        # the failed registry without our callback): the mark goes with the batch's registration.
        # rq 3.0.0: `IntermediateQueue.get_first_seen_key` names that mark.
        pipe.delete(queue.intermediate_queue.get_first_seen_key(rq_job.id))
        if ticket is not None:
            records.claim(pipe, ticket.job_id, ticket.batch_id)
        answers = pipe.execute()
    worker.executions[execution.id] = execution
    return kind(rq_job, execution, queue, ticket, None if ticket is None else answers[-1], taken)


def finish(worker: DrainWorker, held: Registered, pipe: Pipeline, result: dict) -> None:
    """rq's success path for the batch (result, finished registry, execution cleanup, the worker's
    counts), added to `pipe`: the transaction that counts the batch for its job, one round trip.

    Batches have no dependents, repeats, success callback or webhooks (the producer sets none,
    and `BatchJob` refuses a foreign callback), so rq's WATCH on the dependents is not needed.
    """
    rq_job, execution = held.rq_job, held.execution
    rq_job.ended_at = now()
    # rq 3.0.0: `Worker.handle_job_success` sets `Job._result` and calls `Job._handle_success`; neither has
    # a public counterpart that joins a caller's pipeline.
    rq_job._result = result
    ttl = rq_job.get_result_ttl(worker.default_result_ttl)
    worker.increment_successful_job_count(pipeline=pipe)
    worker.increment_total_working_time(rq_job.ended_at - rq_job.started_at, pipe)
    rq_job._handle_success(ttl, pipeline=pipe, worker_name=worker.name, execution_id=execution.id,
                           execution_started_at=execution.created_at, execution_ended_at=rq_job.ended_at)
    rq_job.cleanup(ttl, pipeline=pipe, remove_from_queue=False)
    worker.cleanup_execution(rq_job, pipeline=pipe, execution=execution)


def fail(worker: DrainWorker, held: Registered, exc_info: ExcInfo) -> None:
    """rq's failure path for the batch: our failure callback, then `Retry` or the failed registry."""
    held.rq_job.ended_at = now()
    # rq 3.0.0: `Worker._finalize_failure` is `handle_job_failure` with the failure callback first, as
    # `perform_job` runs them.
    worker._finalize_failure(held.rq_job, held.queue, held.execution, exc_info)


def put_back(worker: DrainWorker, held: Sequence[Registered], returned: Sequence[Registered]) -> None:
    """Batches taken but not started go back to the front of their queues, in the order they were taken;
    one taken after a batch already put back (`returned`) goes right behind it."""
    with worker.connection.pipeline() as pipe:
        for h in sorted(held, key=lambda h: h.taken, reverse=True):
            h.execution.delete(job=h.rq_job, pipeline=pipe)
            h.rq_job.set_status(JobStatus.QUEUED, pipeline=pipe)
            before = [r for r in returned if r.queue.key == h.queue.key and r.taken < h.taken]
            behind = max(before, key=lambda r: r.taken).batch_id if before else ""
            PUT_BACK.run(pipe, {"queue": h.queue.key}, batch_id=h.rq_job.id, behind=behind)
        pipe.execute()
    for h in held:
        worker.executions.pop(h.execution.id, None)


def beat(worker: DrainWorker, held: Sequence[Registered]) -> None:
    """One pipeline: the worker's heartbeat and every held batch's (rq's `maintain_heartbeats`, batched)."""
    with worker.connection.pipeline() as pipe:
        worker.heartbeat(worker.job_monitoring_interval + 60, pipeline=pipe)
        # rq's loop sets the state per batch; the drain's lanes do not, so `rq info` would show `?`.
        worker.set_state(WorkerStatus.BUSY if held else WorkerStatus.IDLE, pipeline=pipe)
        for h in held:
            ttl = worker.get_heartbeat_ttl(h.rq_job)
            h.execution.heartbeat(h.rq_job.started_job_registry, ttl, pipeline=pipe)
            h.rq_job.heartbeat(now(), ttl, pipeline=pipe, xx=True)
        pipe.execute()
