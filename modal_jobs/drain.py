"""One GPU container's life as plain code: load the weights, move them to the GPU, drain, account.

The Modal class in `modal_jobs.app` only calls these methods from its hooks, so the suite
runs the same code on CPU against real Redis and MongoDB. Each container keeps one
document in MongoDB `workers` (`_id` = the worker name the ledger records with each batch):
its cold start, the compute seconds of its batches (busy) and the seconds it existed
(billed: idle included, which is what the GPU costs).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from pymongo.database import Database
from pymongo.errors import PyMongoError

from config.errors import StoreError
from config.settings import Settings
from worker.embedder import Embedder, default_device, get_embedder, move_embedder
from worker.loop import DrainWorker, make_worker
from worker.loop import drain as drain_queue

logger = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class WorkerRecord:
    """The `workers` document of one container."""

    worker: str
    gpu: str  # the GPU type the app asked for
    device: str  # what torch reports (e.g. "NVIDIA A10G"), or "cpu"
    model: str
    gpu_price_per_hour: float
    # Cold start: process start (or the restore of a memory snapshot) -> model ready on its device.
    started_at: datetime
    ready_at: datetime
    cold_start_seconds: float
    from_snapshot: bool
    load_seconds: float  # weights into CPU memory; 0 when they came with the snapshot
    to_device_seconds: float  # move to the GPU (bf16) and warm-up
    drains: int = 0
    batches: int = 0
    failed: int = 0
    embedded: int = 0
    skipped: int = 0
    busy_seconds: float = 0.0  # sum of the ledger `gpu_seconds` of this container's batches
    billed_seconds: float = 0.0  # started_at -> last update (exit, once it has exited)
    updated_at: datetime | None = None
    exited_at: datetime | None = None


def save_worker(db: Database, record: WorkerRecord) -> None:
    try:
        # `_id` in the document too: nx-27017 does not take it from the filter on upsert.
        db.workers.replace_one({"_id": record.worker}, {"_id": record.worker, **asdict(record)}, upsert=True)
    except PyMongoError as exc:
        raise StoreError(f"cannot write worker record {record.worker}: {exc}") from exc


@dataclass
class DrainSummary:
    """What one drain call did, and the container's billed seconds so far."""

    worker: str
    batches: int
    failed: int
    chunks: int
    embedded: int
    skipped: int
    busy_seconds: float
    billed_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


class Container:
    """The model loaded once, drains on demand, and the container's `workers` record kept current.

    Order of calls: `load_weights` (before a memory snapshot: CPU only, no connections),
    `start` (after the restore: GPU, Redis, MongoDB), then `drain` any number of times,
    and `stop` when the container exits.
    """

    def __init__(self, settings: Settings, *, gpu: str, started_at: datetime | None = None) -> None:
        self.settings = settings
        self.gpu = gpu
        self.started_at = started_at or utcnow()
        self._embedder: Embedder | None = None
        self._loaded_in = ""
        self._load_seconds = 0.0
        self._worker: DrainWorker | None = None
        self._db: Database | None = None
        self.record: WorkerRecord | None = None

    def load_weights(self, task_id: str = "") -> None:
        """Load the model into CPU memory; `task_id` names the container doing it."""
        s = self.settings
        began = time.perf_counter()
        self._embedder = get_embedder(s.model_source(), revision=s.model_revision,
                                      pool_instruction=s.pools_instruction(), device="cpu",
                                      micro_batch_size=s.micro_batch_size, max_forward_tokens=s.max_forward_tokens)
        self._load_seconds = time.perf_counter() - began
        self._loaded_in = task_id

    def start(self, task_id: str = "", settings: Settings | None = None) -> WorkerRecord:
        """Move the model to its device, connect, and write the cold start to `workers`.

        A container restored from a memory snapshot has another task id than the one that
        loaded the weights: its life (and its bill) begins at the restore, now. `settings`
        read after a restore replace those the snapshot holds (URIs and tokens may have changed).
        """
        assert self._embedder is not None, "load_weights first"
        self.settings = settings or self.settings
        from_snapshot = task_id != self._loaded_in
        if from_snapshot:
            self.started_at = utcnow()
        began = time.perf_counter()
        device = self.settings.device or default_device()
        embedder = move_embedder(self._embedder, device)
        to_device_seconds = time.perf_counter() - began
        ready_at = utcnow()
        self._worker, ctx = make_worker(self.settings.replace(device=device), name=task_id or None)
        self._db = ctx.store.db
        self.record = WorkerRecord(
            worker=ctx.name, gpu=self.gpu, device=embedder.device_name, model=self.settings.model,
            gpu_price_per_hour=self.settings.gpu_price_per_hour, started_at=self.started_at, ready_at=ready_at,
            cold_start_seconds=(ready_at - self.started_at).total_seconds(), from_snapshot=from_snapshot,
            load_seconds=0.0 if from_snapshot else self._load_seconds, to_device_seconds=to_device_seconds,
        )
        self._save()
        logger.info("worker %s ready on %s: cold start %.1fs (%s)", ctx.name, embedder.device_name,
                    self.record.cold_start_seconds, "from snapshot" if from_snapshot else "no snapshot")
        return self.record

    def drain(self, time_budget_s: float | None = None) -> DrainSummary:
        """Run batches until the queue is empty or `time_budget_s` is spent."""
        assert self._worker is not None and self.record is not None, "start first"
        tally = drain_queue(self._worker, time_budget_s=time_budget_s)
        r = self.record
        r.drains += 1
        r.batches += tally.batches
        r.failed += tally.failed
        r.embedded += tally.embedded
        r.skipped += tally.skipped
        r.busy_seconds += tally.busy_seconds
        self._save()
        return DrainSummary(
            worker=r.worker, batches=tally.batches, failed=tally.failed, chunks=tally.embedded + tally.skipped,
            embedded=tally.embedded, skipped=tally.skipped, busy_seconds=tally.busy_seconds,
            billed_seconds=r.billed_seconds,
        )

    def stop(self) -> None:
        """Record the exit: billed seconds now include the idle time before the container stopped."""
        if self.record is None:
            return
        self.record.exited_at = utcnow()
        self._save()

    def _save(self) -> None:
        assert self.record is not None and self._db is not None
        now = utcnow()
        self.record.updated_at = now
        self.record.billed_seconds = (now - self.record.started_at).total_seconds()
        save_worker(self._db, self.record)
