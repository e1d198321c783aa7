"""The drain's three lanes, each a thread with one job, handing batches over through bounded queues:

    fetch  (dequeue, register as started, load the batch, dedupe lookup)
      -> embed  (forward passes only; no socket)
        -> store  (vectors, ledger, job counters, rq's finish)

While batch N is on the model, batch N+1 is already fetched and looked up and batch N-1 is
being written. A batch looked up before the vectors of the batches ahead of it were stored reuses
them from the embed lane (`Computed`): a text is embedded once even in back-to-back jobs. The fetch
lane keeps `settings.prefetch_batches` full batches of work ahead of the model, in at most
`prefetch_batches + 1` batches (`Ahead`); the store lane holds one more.

The fetch lane takes from the queues in priority order (`producer.batches.take`): ingest, nightly,
backfill. It takes only when there is room ahead of the model, so once a higher batch is queued, a
worker holds no more lower batches than it already had: at most `prefetch_batches + 1` fetched
ahead, one on the model and the ones being stored.

Every lane ends on the one sentinel `DONE`. A batch's error fails that batch only (rq's failure
path); whatever else escapes a lane (a Redis error, say) halts the drain (`worker.pipeline.Drain`),
naming the batch in hand. `worker.pipeline.run_drain` starts the lanes and stops them.
"""

from __future__ import annotations

import queue as handoff
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from bson.binary import Binary
from redis.exceptions import RedisError

from config.settings import Settings
from producer.batches.job import read_ticket
from producer.batches.lifecycle import Registered
from producer.batches.take import Idle
from producer.batches.upkeep import enqueue_due_retries
from worker.store import to_bson_vector
from worker.tasks import (
    ComputedBatch,
    PreparedBatch,
    WorkerContext,
    compute_batch,
    prepare_batch,
    reuse_vectors,
    store_batch,
)

if TYPE_CHECKING:
    from worker.pipeline import Drain

DONE = object()  # the sentinel every lane ends on
POLL_SECONDS = 0.1  # how often a waiting lane looks at the stop and halt flags
IDLE_SECONDS = 0.25  # how often an empty queue is looked at again while batches are in flight or due


@dataclass
class Held(Registered):
    """A batch this worker took off the queue (`Registered` with rq), with what its stages made of it."""

    prepared: PreparedBatch | None = None
    computed: ComputedBatch | None = None


def _get(inbox: handoff.Queue, drain: Drain) -> object:
    """The next item, or DONE once the drain is halted."""
    while not drain.halted.is_set():
        try:
            return inbox.get(timeout=POLL_SECONDS)
        except handoff.Empty:
            continue
    return DONE


def _put(outbox: handoff.Queue, item: object, drain: Drain) -> None:
    while not drain.halted.is_set():
        try:
            outbox.put(item, timeout=POLL_SECONDS)
            return
        except handoff.Full:
            continue


class Lane(threading.Thread):
    """A thread with one job; whatever escapes it halts the drain, naming the batch in hand."""

    def __init__(self, name: str, drain: Drain, outbox: handoff.Queue) -> None:
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

    def __init__(self, drain: Drain, outbox: handoff.Queue, ahead: Ahead) -> None:
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

    def __init__(self, drain: Drain, inbox: handoff.Queue, outbox: handoff.Queue, ahead: Ahead) -> None:
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

    def __init__(self, drain: Drain, inbox: handoff.Queue) -> None:
        super().__init__("store", drain, handoff.Queue())
        self.inbox = inbox

    def work(self) -> None:
        d = self.drain
        while (held := _get(self.inbox, d)) is not DONE:
            assert isinstance(held, Held) and held.computed is not None
            computed = held.computed
            result = self.attempt(held, lambda c=computed, h=held: store_batch(d.ctx, c, partial(d.finish, h)))
            if result is not None:
                d.finished(held, result)  # type: ignore[arg-type]


def prepare(ctx: WorkerContext, held: Held) -> PreparedBatch:
    """The prepare stage of a held batch; a payload the take could not read fails here, with why."""
    ticket = held.ticket if held.ticket is not None else read_ticket(held.rq_job)
    return prepare_batch(ctx, ticket, held.claimed)
