"""The pipelined drain: the model never waits on Redis or MongoDB.

The three lanes of `worker.lanes` (fetch, embed, store), each a thread with one job, overlap the
stages of consecutive batches; the `Drain` is what they share: the worker, the queues, the batches
held and the stop flags. A housekeeper thread beats for every batch held (prefetched ones too),
runs rq's maintenance and moves due retries onto the queue.

What rq records of each batch (its registration, finish, failure, put back, heartbeats) is
`producer.batches`; the drain and its lanes say only when.

`run_drain` owns the order and the shutdown. Every lane ends on the one sentinel `DONE`.
A batch that fails goes through rq's failure path (failure callback, `Retry`) and the drain
goes on; an error of a lane itself (Redis gone, say) stops every lane and surfaces once,
naming the batch. SIGTERM, SIGINT or the budget running out put the batches fetched but not
yet on the model back at the front of the queue at once; the batch on the model and the one
being stored finish. A SIGKILL leaves every held batch registered as started: its heartbeats
stop, and rq's abandoned-job cleanup retries it as it would the batch in hand.
"""

from __future__ import annotations

import logging
import queue as handoff
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import partial

from redis.client import Pipeline
from redis.exceptions import RedisError

from config.errors import DrainError
from producer.batches import lifecycle
from producer.batches.lifecycle import ExcInfo
from producer.batches.take import Idle, PriorityTake
from producer.batches.upkeep import (
    enqueue_due_retries,
    fail_deleted_batches_of_open_jobs,
    maintain,
    release_locks,
    scheduler_for,
)
from producer.batches.worker import BatchQueue, DrainWorker, RetryScheduler
from worker.lanes import DONE, POLL_SECONDS, Ahead, EmbedLane, FetchLane, Held, StoreLane
from worker.tasks import BatchResult, WorkerContext

logger = logging.getLogger(__name__)

TAKE_POLL_SECONDS = 0.2  # how often a long-running worker looks at empty queues (no blocking pop covers three)
TAKE_WAIT_SECONDS = 1.0  # how long one take waits for a batch, so the fetch lane's other duties come round
REDIS_THREADS = 5  # the drain's threads that talk to Redis: the caller's, fetch, store, housekeeper, reporter


@dataclass
class DrainTally:
    """What one drain ran; `busy_seconds` adds up the compute seconds its batches report to the ledger."""

    batches: int = 0
    failed: int = 0
    embedded: int = 0
    skipped: int = 0
    busy_seconds: float = 0.0


@dataclass
class Drain:
    """What the lanes of one drain share: the worker, the queues, the held batches and the stop flags."""

    worker: DrainWorker  # rq's bookkeeping for each batch
    ctx: WorkerContext
    queues: list[BatchQueue]  # highest priority first
    taker: PriorityTake
    deadline: float | None  # time.monotonic()
    burst: bool
    scheduler: RetryScheduler  # moves due retries while this worker holds rq's scheduler lock
    stopping: threading.Event = field(default_factory=threading.Event)  # warm stop: take nothing new
    # The worker is registered with rq (its first batch is taken meanwhile): a batch's end, which counts it in
    # the worker's hash, waits for it; rq refuses to register a worker whose hash exists.
    born: threading.Event = field(default_factory=threading.Event)
    halted: threading.Event = field(default_factory=threading.Event)  # a lane failed: everything stops
    # A held batch ended, or the drain stops: a burst drain's idle fetch lane looks again at once, so
    # the drain ends right after its last batch is stored rather than at its next poll.
    settled: threading.Event = field(default_factory=threading.Event)
    error: tuple[str, BaseException] | None = None
    tally: DrainTally = field(default_factory=DrainTally)
    held: dict[str, Held] = field(default_factory=dict)
    taken: int = 0  # batches taken so far
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Batches put back so far: a lane that held one when the stop came puts it back after the others.
    returned: list[Held] = field(default_factory=list)
    returning: threading.Lock = field(default_factory=threading.Lock)

    @property
    def keep_seconds(self) -> int:
        return self.ctx.settings.result_ttl

    def stop(self, why: str) -> None:
        if not self.stopping.is_set():
            logger.info("worker %s: stopping (%s): batches fetched ahead go back to the queue", self.worker.name, why)
            self.stopping.set()
            self.settled.set()

    def halt(self, batch_id: str, exc: BaseException) -> None:
        """A lane failed: record the first error, stop every lane."""
        with self.lock:
            if self.error is None:
                self.error = (batch_id, exc)
        self.stopping.set()
        self.halted.set()
        self.settled.set()

    def snapshot(self) -> list[Held]:
        with self.lock:
            return list(self.held.values())

    def take(self) -> Held | Idle:
        """Move the next batch of the highest queue holding one to this worker (one round trip, its
        hash with it), register it as started and claim it for its job (another)."""
        # A long-running worker waits a second at most, looking at the stop flag between looks.
        until = None if self.burst else time.monotonic() + TAKE_WAIT_SECONDS
        while True:
            taken = self.taker()
            if isinstance(taken, Idle):
                if until is None or time.monotonic() >= until or self.stopping.wait(TAKE_POLL_SECONDS):
                    return taken
                continue
            rq_job = lifecycle.load_taken(taken, keep_seconds=self.keep_seconds)
            if rq_job is not None:
                break
        # Only the fetch lane takes: the count read here is the one incremented below.
        held = lifecycle.register(self.worker, taken.queue, rq_job, self.ctx.records, taken=self.taken, kind=Held)
        with self.lock:
            self.taken += 1
            self.held[held.batch_id] = held
        return held

    def registered(self) -> bool:
        """Wait until the worker is registered with rq; False if its registration failed."""
        while not self.born.wait(POLL_SECONDS):
            if self.halted.is_set():
                return False
        return True

    def beyond_budget(self, due: float | None) -> bool:
        """Whether a retry due then (Unix time; None: no retry) falls after the drain's budget."""
        if due is None or self.deadline is None:
            return True
        return due - time.time() >= self.deadline - time.monotonic()

    def finish(self, held: Held, pipe: Pipeline, result: BatchResult) -> None:
        """rq's success path for the batch, added to `pipe`: the transaction that counts it for its job."""
        if not self.registered():
            raise DrainError(f"worker {self.worker.name}: not registered with rq")
        lifecycle.finish(self.worker, held, pipe, result.to_dict())

    def finished(self, held: Held, result: BatchResult) -> None:
        with self.lock:
            self.held.pop(held.batch_id, None)
            t = self.tally
            t.batches += 1
            t.embedded += result.embedded
            t.skipped += result.skipped
            t.busy_seconds += result.gpu_seconds
        self.settled.set()

    def fail(self, held: Held, exc_info: ExcInfo) -> None:
        """A batch failed: rq's failure path (our failure callback, then `Retry` or the failed registry).

        If the worker could not register, the batch stays started: rq's abandoned-job cleanup retries it.
        """
        if not self.registered():
            return
        lifecycle.fail(self.worker, held, exc_info)
        with self.lock:
            self.held.pop(held.batch_id, None)
            self.tally.batches += 1
            self.tally.failed += 1
        self.settled.set()

    def put_back(self, held: list[Held]) -> None:
        """Batches fetched but not started go back to the front of their queues, in the order they were
        taken, whichever lane puts each back first: one taken after a batch already put back goes right
        behind it (the fetch lane may put back the batch it was preparing after the others went)."""
        if not held:
            return
        with self.returning:
            lifecycle.put_back(self.worker, held, self.returned)
            self.returned.extend(held)
        for h in held:
            if h.prepared is not None:
                self.ctx.records.mark_retrying(h.prepared.batch.job_id, h.batch_id)
            with self.lock:
                self.held.pop(h.batch_id, None)
        for queue in {h.queue.name: h.queue for h in held}.values():
            logger.info("worker %s: put back at the front of queue %s: %s", self.worker.name, queue.name,
                        ", ".join(h.batch_id for h in held if h.queue is queue))


class Housekeeper(threading.Thread):
    """Beats for every held batch and the worker; rq's maintenance, due retries and deleted batches between beats.
    Releases the scheduler's locks when the drain ends."""

    def __init__(self, drain: Drain) -> None:
        super().__init__(name="housekeeper", daemon=True)
        self.drain = drain
        self.done = threading.Event()

    def run(self) -> None:
        d, s = self.drain, self.drain.ctx.settings
        next_maintenance = 0.0
        while True:
            try:
                self.beat()
                if time.monotonic() >= next_maintenance:
                    first = next_maintenance == 0.0
                    next_maintenance = time.monotonic() + s.maintenance_interval
                    self.maintain(whole=first)
            except RedisError as exc:  # Redis away for a moment: the next beat tries again
                logger.warning("worker %s: heartbeat or maintenance failed: %s", d.worker.name, exc)
            except Exception:
                logger.exception("worker %s: maintenance failed; the next pass tries again", d.worker.name)
            if self.done.wait(s.heartbeat_interval):
                break
        try:  # while the worker deregisters
            release_locks(d.scheduler)
        except RedisError as exc:
            logger.warning("worker %s: could not release its scheduler locks: %s", d.worker.name, exc)

    def maintain(self, *, whole: bool) -> None:
        """rq's maintenance of each queue (after the drain's first pass, one drain of the fleet's per
        interval), then the due retries. A pass after the drain's first stops
        between those steps once the drain ends: a pass is a few dozen round trips, and the drain's end
        waits for the housekeeper (another pass, this worker's next or another worker's, does the rest)."""
        d = self.drain
        every = None if whole else d.ctx.settings.maintenance_interval
        steps = [*(partial(maintain, queue, d.worker, keep_seconds=d.keep_seconds, every=every) for queue in d.queues),
                 partial(enqueue_due_retries, d.scheduler, d.queues, keep_seconds=d.keep_seconds),
                 partial(fail_deleted_batches_of_open_jobs, d.ctx.records)]
        for step in steps:
            if self.done.is_set() and not whole:
                return
            step()

    def beat(self) -> None:
        """The worker's heartbeat and every held batch's, in one pipeline."""
        lifecycle.beat(self.drain.worker, self.drain.snapshot())


def run_drain(worker: DrainWorker, ctx: WorkerContext, *, time_budget_s: float | None = None,
              burst: bool = True) -> DrainTally:
    """Drain the queues through the three lanes until they are empty (`burst`), the budget is spent, or a signal.

    Raises the first error of a lane (a `RedisError` from rq's bookkeeping, say), naming its batch.
    """
    settings = ctx.settings
    queues = worker.batch_queues(settings.queue_names())
    d = Drain(worker=worker, ctx=ctx, queues=queues, burst=burst,
              taker=PriorityTake(worker.connection, queues, settings.backfill_share),
              deadline=None if time_budget_s is None else time.monotonic() + time_budget_s,
              scheduler=scheduler_for(queues, f"{worker.name}:scheduler"))
    ahead = Ahead(settings)
    fetched: handoff.Queue = handoff.Queue(maxsize=settings.prefetch_batches + 2)  # + the sentinel
    computed: handoff.Queue = handoff.Queue(maxsize=1)
    fetch, embed, store = FetchLane(d, fetched, ahead), EmbedLane(d, fetched, computed, ahead), StoreLane(d, computed)
    housekeeper = Housekeeper(d)

    def on_signal(signum: int, _frame: object) -> None:
        d.stop(signal.Signals(signum).name)

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for lane in (store, embed, fetch):
            lane.start()
        try:  # while the first batch is taken
            worker.register_birth()
        except Exception as exc:
            d.halt("(worker registration)", exc)
            raise
        d.born.set()
        housekeeper.start()  # after the birth: rq refuses to register a worker whose key exists
        while store.is_alive():
            store.join(POLL_SECONDS)
            if d.deadline is not None and time.monotonic() >= d.deadline:
                d.stop("time budget spent")
            if d.stopping.is_set() and not d.halted.is_set():
                d.put_back(_unstarted(fetched))
    finally:
        d.stopping.set()
        for lane in (fetch, embed):
            lane.join()
        for sig, handler in handlers.items():
            if handler is not None:  # None: not set from Python, nothing to put back
                signal.signal(sig, handler)
        housekeeper.done.set()  # it releases the scheduler's locks on its way out
        try:
            worker.register_death()
        except RedisError as exc:
            logger.warning("worker %s: could not remove its registration: %s", worker.name, exc)
        if housekeeper.is_alive():
            housekeeper.join()
        ctx.settle()  # the last status copies, made meanwhile
    if d.error is not None:
        batch_id, exc = d.error
        raise DrainError(f"worker {worker.name}: stopped at batch {batch_id}: {type(exc).__name__}: {exc}") from exc
    return d.tally


def _unstarted(fetched: handoff.Queue) -> list[Held]:
    """Empty the fetch lane's outbox, keeping the sentinel in it."""
    taken: list[Held] = []
    sentinel = False
    while True:
        try:
            item = fetched.get_nowait()
        except handoff.Empty:
            break
        if item is DONE:
            sentinel = True
        else:
            assert isinstance(item, Held)
            taken.append(item)
    if sentinel:
        fetched.put(DONE)
    return taken
