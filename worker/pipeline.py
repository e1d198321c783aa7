"""The pipelined drain: the model never waits on Redis or MongoDB.

Three lanes, each a thread with one job, hand batches over through bounded queues:

    fetch  (dequeue, register as started, load the batch, dedupe lookup)
      -> embed  (forward passes only; no socket)
        -> store  (vectors, ledger, job counters, rq's finish)

While batch N is on the model, batch N+1 is already fetched and looked up and batch N-1 is
being written. A batch looked up before the vectors of the batches ahead of it were stored reuses
them from the embed lane (`Computed`): a text is embedded once even in back-to-back jobs. The fetch
lane keeps `settings.prefetch_batches` full batches of work ahead of the model, in at most
`prefetch_batches + 1` batches (`Ahead`); the store lane holds one more. A housekeeper thread
beats for every batch held (prefetched ones too), runs rq's maintenance and moves due retries onto
the queue.

What rq records of each batch (its registration, finish, failure, put back, heartbeats) is
`producer.batches`; the lanes here say only when.

The fetch lane takes from the queues in priority order (`producer.batches.take`): ingest, nightly,
backfill. It takes only when there is room ahead of the model, so once a higher batch is queued, a
worker holds no more lower batches than it already had: at most `prefetch_batches + 1` fetched
ahead, one on the model and the ones being stored.

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
import queue as lanes
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from bson.binary import Binary
from redis.client import Pipeline
from redis.exceptions import RedisError

from config.errors import DrainError
from config.settings import Settings
from producer.batches import lifecycle
from producer.batches.job import read_ticket
from producer.batches.lifecycle import ExcInfo, Registered
from producer.batches.take import Idle, PriorityTake
from producer.batches.upkeep import (
    enqueue_due_retries,
    fail_deleted_batches_of_open_jobs,
    maintain,
    release_locks,
    scheduler_for,
)
from producer.batches.worker import BatchQueue, DrainWorker, RetryScheduler
from worker.store import to_bson_vector
from worker.tasks import (
    BatchResult,
    ComputedBatch,
    PreparedBatch,
    WorkerContext,
    compute_batch,
    prepare_batch,
    reuse_vectors,
    store_batch,
)

logger = logging.getLogger(__name__)

DONE = object()  # the sentinel every lane ends on
POLL_SECONDS = 0.1  # how often a waiting lane looks at the stop and halt flags
IDLE_SECONDS = 0.25  # how often an empty queue is looked at again while batches are in flight or due
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
class Held(Registered):
    """A batch this worker took off the queue (`Registered` with rq), with what its stages made of it."""

    prepared: PreparedBatch | None = None
    computed: ComputedBatch | None = None


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


def _get(inbox: lanes.Queue, drain: Drain) -> object:
    """The next item, or DONE once the drain is halted."""
    while not drain.halted.is_set():
        try:
            return inbox.get(timeout=POLL_SECONDS)
        except lanes.Empty:
            continue
    return DONE


def _put(outbox: lanes.Queue, item: object, drain: Drain) -> None:
    while not drain.halted.is_set():
        try:
            outbox.put(item, timeout=POLL_SECONDS)
            return
        except lanes.Full:
            continue


class Lane(threading.Thread):
    """A thread with one job; whatever escapes it halts the drain, naming the batch in hand."""

    def __init__(self, name: str, drain: Drain, outbox: lanes.Queue) -> None:
        super().__init__(name=name, daemon=True)
        self.drain = drain
        self.outbox = outbox
        self.current = ""  # the batch in hand, for the error

    def run(self) -> None:
        try:
            self.work()
        except BaseException as exc:
            self.drain.halt(self.current or f"({self.name} lane)", exc)
        finally:
            _put(self.outbox, DONE, self.drain)

    def work(self) -> None:
        raise NotImplementedError

    def attempt(self, held: Held, stage: Callable[[], object]) -> object | None:
        """Run one stage of a batch; a batch error fails that batch only (None), a Redis error the lane."""
        self.current = held.batch_id  # kept if a Redis error escapes: the halt names this batch
        try:
            result = stage()
        except RedisError:
            raise
        except Exception:
            exc_type, exc, tb = sys.exc_info()
            assert exc_type is not None and exc is not None
            self.drain.fail(held, (exc_type, exc, tb))
            result = None
        self.current = ""
        return result


class Ahead:
    """The work fetched ahead of the model, counted in full batches.

    A batch weighs its share of a full batch: the texts it gives the model over `batch_max_chunks`,
    or their tokens over `batch_max_tokens`, whichever is more; a batch being fetched weighs one
    until it is known. The fetch lane takes another batch while less than `prefetch_batches` full
    batches wait, and never holds more than `prefetch_batches + 1`: a job's last batch of a few
    chunks does not leave the model waiting a whole fetch after it.
    """

    def __init__(self, settings: Settings) -> None:
        self.depth = settings.prefetch_batches
        self.max_chunks, self.max_tokens = settings.batch_max_chunks, settings.batch_max_tokens
        self.weights: dict[str, float] = {}  # batch id -> weight, fetched and not yet on the model
        self.fetching = 0
        self.changed = threading.Condition()

    def _room(self) -> bool:
        return (len(self.weights) + self.fetching <= self.depth
                and sum(self.weights.values()) + self.fetching < self.depth)

    def reserve(self, timeout: float) -> bool:
        """Wait up to `timeout` for room, and count a batch being fetched."""
        with self.changed:
            if not self.changed.wait_for(self._room, timeout):
                return False
            self.fetching += 1
            return True

    def fetched(self, held: Held) -> None:
        """The batch being fetched is loaded and looked up (`held.prepared`): it weighs what it holds."""
        assert held.prepared is not None
        groups = held.prepared.groups
        weight = max(len(groups) / self.max_chunks, sum(chunks[0].n_tokens for _, chunks in groups) / self.max_tokens)
        with self.changed:
            self.fetching -= 1
            self.weights[held.batch_id] = weight
            self.changed.notify_all()

    def dropped(self) -> None:
        """Nothing came of the fetch (an empty queue, a batch that failed)."""
        with self.changed:
            self.fetching -= 1
            self.changed.notify_all()

    def started(self, held: Held) -> None:
        """The batch left the fetched ones (to the model, or back to the queue)."""
        with self.changed:
            self.weights.pop(held.batch_id, None)
            self.changed.notify_all()


class FetchLane(Lane):
    """Takes batches off the queue while there is room ahead of the model; loads and looks them up."""

    def __init__(self, drain: Drain, outbox: lanes.Queue, ahead: Ahead) -> None:
        super().__init__("fetch", drain, outbox)
        self.ahead = ahead

    def work(self) -> None:
        d = self.drain
        while not d.stopping.is_set():
            if not self.ahead.reserve(POLL_SECONDS):
                continue
            if d.deadline is not None and time.monotonic() >= d.deadline:
                d.stop("time budget spent")
                break
            d.settled.clear()
            idle = not d.snapshot()  # read before the take: a batch in flight may still fail into a retry
            held = d.take()
            if isinstance(held, Idle):
                self.ahead.dropped()
                if held.due is not None and held.due <= time.time():
                    enqueue_due_retries(d.scheduler, d.queues, keep_seconds=d.keep_seconds)
                    continue
                if d.burst and idle and d.beyond_budget(held.due):
                    break  # queues empty, nothing in flight, no retry due within the budget
                d.settled.wait(IDLE_SECONDS if d.burst else 0)
                continue
            prepared = self.attempt(held, lambda h=held: prepare(d.ctx, h))
            if prepared is None:
                self.ahead.dropped()
                continue
            held.prepared = prepared  # type: ignore[assignment]
            self.ahead.fetched(held)
            if d.stopping.is_set():
                d.put_back([held])
                break
            _put(self.outbox, held, d)


class Computed:
    """The vectors of the batches the embed lane computed last, by text key.

    A batch's lookup in MongoDB misses the vectors of the batches ahead of it that were not stored
    yet: at most the one being stored, the one waiting for the store lane, the one on the model, and
    the `prefetch_batches` others fetched ahead (`Ahead` holds `prefetch_batches + 1` with it). So
    the last `prefetch_batches + 3` computed batches hold every vector its lookup could miss.
    """

    def __init__(self, settings: Settings) -> None:
        # Per batch: its id, and its vectors by text key.
        self.batches: deque[tuple[str, dict[str, Binary]]] = deque(maxlen=settings.prefetch_batches + 3)

    def add(self, computed: ComputedBatch) -> None:
        groups = computed.prepared.groups
        self.batches.append((computed.prepared.batch.batch_id, {
            key: to_bson_vector(vector, computed.prepared.batch.spec.dtype)
            for (key, _), vector in zip(groups, computed.vectors, strict=True)}))

    def reuse(self, prepared: PreparedBatch, dim: int) -> PreparedBatch:
        """The batch reusing what was computed for its texts; not what an earlier run of the same batch
        computed, so that a batch run again counts its chunks embedded, as the MongoDB lookup does."""
        vectors = {key: vector for batch_id, found in self.batches if batch_id != prepared.batch.batch_id
                   for key, vector in found.items()}
        return reuse_vectors(prepared, vectors, dim=dim)


class EmbedLane(Lane):
    """Runs the model on one batch at a time; makes room ahead of it as it takes a batch."""

    def __init__(self, drain: Drain, inbox: lanes.Queue, outbox: lanes.Queue, ahead: Ahead) -> None:
        super().__init__("embed", drain, outbox)
        self.inbox = inbox
        self.ahead = ahead
        self.computed = Computed(drain.ctx.settings)

    def work(self) -> None:
        d = self.drain
        while (held := _get(self.inbox, d)) is not DONE:
            assert isinstance(held, Held)
            self.ahead.started(held)
            if d.stopping.is_set():
                d.put_back([held])
                continue
            assert held.prepared is not None
            prepared = held.prepared
            computed = self.attempt(held, lambda p=prepared: self.compute(p))
            if computed is not None:
                held.computed = computed  # type: ignore[assignment]
                _put(self.outbox, held, d)

    def compute(self, prepared: PreparedBatch) -> ComputedBatch:
        ctx = self.drain.ctx
        computed = compute_batch(ctx, self.computed.reuse(prepared, ctx.embedder(prepared.batch.spec).dim))
        self.computed.add(computed)
        return computed


class StoreLane(Lane):
    """Writes each computed batch and ends it in rq, in the transaction that counts it."""

    def __init__(self, drain: Drain, inbox: lanes.Queue) -> None:
        super().__init__("store", drain, lanes.Queue())
        self.inbox = inbox

    def work(self) -> None:
        d = self.drain
        while (held := _get(self.inbox, d)) is not DONE:
            assert isinstance(held, Held) and held.computed is not None
            computed = held.computed
            result = self.attempt(held, lambda c=computed, h=held: store_batch(d.ctx, c, partial(d.finish, h)))
            if result is not None:
                d.finished(held, result)  # type: ignore[arg-type]


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


def prepare(ctx: WorkerContext, held: Held) -> PreparedBatch:
    """The prepare stage of a held batch; a payload the take could not read fails here, with why."""
    ticket = held.ticket if held.ticket is not None else read_ticket(held.rq_job)
    return prepare_batch(ctx, ticket, held.claimed)


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
    fetched: lanes.Queue = lanes.Queue(maxsize=settings.prefetch_batches + 2)  # + the sentinel
    computed: lanes.Queue = lanes.Queue(maxsize=1)
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


def _unstarted(fetched: lanes.Queue) -> list[Held]:
    """Empty the fetch lane's outbox, keeping the sentinel in it."""
    taken: list[Held] = []
    sentinel = False
    while True:
        try:
            item = fetched.get_nowait()
        except lanes.Empty:
            break
        if item is DONE:
            sentinel = True
        else:
            assert isinstance(item, Held)
            taken.append(item)
    if sentinel:
        fetched.put(DONE)
    return taken
