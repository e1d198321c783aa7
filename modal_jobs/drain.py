"""One GPU container's life as plain code: load the weights, move them to the GPU, drain, account.

The Modal class in `modal_jobs.app` only calls these methods from its hooks, so the suite
runs the same code on CPU against real Redis and MongoDB. Each container keeps one
document in MongoDB `workers` (`_id` = the worker name the ledger records with each batch):
its cold start, the compute seconds of its batches (busy) and the seconds it existed
(billed: idle included, which is what the GPU costs), kept current by a heartbeat.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from pymongo.database import Database
from pymongo.errors import PyMongoError

from config.errors import ConfigError, DeviceError, StoreError
from config.settings import Settings
from modal_jobs.launcher import read_backlog
from modal_jobs.spawns import SpawnLedger
from producer.batches.worker import DrainWorker
from producer.enqueue import vector_spec
from worker.embedder import Embedder, cuda_report, get_embedder, move_embedder, weight_bytes
from worker.loop import drain as drain_queue
from worker.loop import make_worker

logger = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class WorkerRecord:
    """The `workers` document of one container."""

    worker: str
    gpu: str  # the GPU type the app asked for ("cpu": a CPU container)
    device: str  # what torch reports (e.g. "NVIDIA A10G"), or "cpu"
    model: str
    model_revision: str | None
    price_per_hour: float  # of `device`, from PODEMBED_GPU_PRICES: what busy seconds cost
    # Of the container's life: its GPU (none for a CPU container) and its reserved CPU cores and memory, which
    # Modal bills on top of the GPU (at least: it bills the higher of reservation and use).
    billed_price_per_hour: float
    snapshot: str  # what the deployment's memory snapshot holds the weights in: "cpu" or "gpu" memory
    torch_cuda: str | None  # the CUDA version torch was built with
    cuda_driver: str | None  # the NVIDIA driver's version
    weight_dtype: str
    weight_bytes: int  # parameters and buffers: what the snapshot and the copy to the GPU carry
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
    # started_at -> the last heartbeat (every PODEMBED_HEARTBEAT_INTERVAL s), or the exit once it has
    # exited: a container killed before @exit (preempted, OOM, timed out) is closed at its last beat.
    billed_seconds: float = 0.0
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
    budget_s: float  # the budget it ran under, clamped under the deployed timeout
    retries_later: int  # retries still waiting out their back-off at its end (the launcher spawns for them)

    def to_dict(self) -> dict:
        return asdict(self)


class Container:
    """The model loaded once, drains on demand, and the container's `workers` record kept current.

    Order of calls: `load_weights` (before a memory snapshot: CPU only, no connections, no CUDA),
    `start` (after the restore: GPU, Redis, MongoDB, heartbeat), then `drain` any number of times,
    and `stop` when the container exits.
    """

    def __init__(self, settings: Settings, *, gpu: str, host_price_per_hour: float = 0.0, snapshot: str = "cpu",
                 started_at: datetime | None = None) -> None:
        self.settings = settings
        self.gpu = gpu
        self.host_price_per_hour = host_price_per_hour  # the reserved CPU cores and memory, USD per hour
        self.snapshot = snapshot  # "gpu": the weights go onto the GPU before the snapshot
        self.started_at = started_at or utcnow()
        self._embedder: Embedder | None = None
        self._loaded_in = ""
        self._load_seconds = 0.0
        self._worker: DrainWorker | None = None
        self._db: Database | None = None
        self._beats = threading.Event()
        self._saving = threading.Lock()
        self.record: WorkerRecord | None = None

    @property
    def wants_gpu(self) -> bool:
        return self.gpu.lower() != "cpu"

    @property
    def weights(self) -> Embedder:
        assert self._embedder is not None, "load_weights first"
        return self._embedder

    def load_weights(self, task_id: str = "") -> None:
        """Load the model into CPU memory; `task_id` names the container doing it. Weights bound
        for a GPU are cast to bf16 here, so the snapshot and the copy to the GPU are half as big.
        With a GPU memory snapshot they go onto the GPU too, and the snapshot holds them there."""
        s = self.settings
        began = time.perf_counter()
        self._embedder = get_embedder(s.model_source(), revision=s.model_revision,
                                      pool_instruction=s.pools_instruction(), device="cpu",
                                      micro_batch_size=s.micro_batch_size, max_forward_tokens=s.max_forward_tokens,
                                      dtype="bfloat16" if self.wants_gpu else "float32")
        if self.snapshot == "gpu":
            self._embedder = move_embedder(self._embedder, self._device())
        self._load_seconds = time.perf_counter() - began
        self._loaded_in = task_id

    def start(self, task_id: str = "", settings: Settings | None = None) -> WorkerRecord:
        """Move the model to its device, connect, and write the cold start to `workers`.

        A container restored from a memory snapshot has another task id than the one that
        loaded the weights: its life (and its bill) begins at the restore, now. `settings`
        read after a restore replace those the snapshot holds (URIs and tokens may have changed),
        but not the model: the snapshot holds one, and a container serves only that one.
        """
        loaded = self.weights
        fresh = settings or self.settings
        if vector_spec(fresh).weights != vector_spec(self.settings).weights:
            raise ConfigError(f"this container's snapshot holds {self.settings.model} (revision "
                              f"{self.settings.model_revision}) but its settings now name {fresh.model} (revision "
                              f"{fresh.model_revision}): deploy again to snapshot the new model")
        self.settings = fresh
        from_snapshot = task_id != self._loaded_in
        if from_snapshot:
            self.started_at = utcnow()
        cuda = cuda_report()
        device = self._device()
        began = time.perf_counter()
        embedder = move_embedder(loaded, device)
        to_device_seconds = time.perf_counter() - began
        ready_at = utcnow()
        self._worker, ctx = make_worker(self.settings.replace(device=device), name=task_id or None)
        self._db = ctx.store.db
        price = self.settings.price_per_hour(embedder.device_name)
        self.record = WorkerRecord(
            worker=ctx.name, gpu=self.gpu, device=embedder.device_name, model=self.settings.model,
            model_revision=self.settings.model_revision, price_per_hour=price,
            billed_price_per_hour=(price if self.wants_gpu else 0.0) + self.host_price_per_hour,
            snapshot=self.snapshot, torch_cuda=cuda.torch_cuda,
            cuda_driver=cuda.driver, weight_dtype=embedder.key.dtype, weight_bytes=weight_bytes(embedder),
            started_at=self.started_at, ready_at=ready_at,
            cold_start_seconds=(ready_at - self.started_at).total_seconds(), from_snapshot=from_snapshot,
            load_seconds=0.0 if from_snapshot else self._load_seconds, to_device_seconds=to_device_seconds,
        )
        self._save()
        threading.Thread(target=self._beat, name="worker-record", daemon=True).start()
        logger.info("worker %s ready on %s: cold start %.1fs (%s)", ctx.name, embedder.device_name,
                    self.record.cold_start_seconds,
                    f"from a {self.snapshot} memory snapshot" if from_snapshot else "no snapshot")
        return self.record

    def _device(self) -> str:
        """The device to drain on; a GPU container without a usable GPU refuses (`DeviceError`)."""
        device = self.settings.device or ("cuda" if self.wants_gpu else "cpu")
        if self.wants_gpu:
            cuda = cuda_report()
            if not (cuda.available and device.startswith("cuda")):
                # Draining on CPU would bill GPU hours for CPU speed, and the ledger would price it as CPU.
                raise DeviceError(f"this container asked for a {self.gpu} GPU and refuses to drain on {device}: "
                                  f"{cuda.line()}")
        return device

    def drain(self, time_budget_s: float, spawn_id: str | None = None) -> DrainSummary:
        """Run batches until the queue is empty or `time_budget_s` is spent; `spawn_id` is the note
        the launcher made when it spawned this call (it is not cold any more)."""
        assert self._worker is not None and self.record is not None, "start first"
        if spawn_id:
            SpawnLedger(self._worker.connection, self.settings.queue_name).started(spawn_id)
        tally = drain_queue(self._worker, time_budget_s=time_budget_s)
        with self._saving:
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
            billed_seconds=r.billed_seconds, budget_s=time_budget_s,
            retries_later=read_backlog(self.settings, self._worker.connection).retries_later,
        )

    def stop(self) -> None:
        """Record the exit: billed seconds now include the idle time before the container stopped."""
        self._beats.set()
        if self.record is None:
            return
        self.record.exited_at = utcnow()
        self._save()

    def _beat(self) -> None:
        while not self._beats.wait(self.settings.heartbeat_interval):
            try:
                self._save()
            except StoreError as exc:  # MongoDB away for a moment: the next beat tries again
                logger.warning("worker %s: record not saved: %s", self.record and self.record.worker, exc)

    def _save(self) -> None:
        assert self.record is not None and self._db is not None
        with self._saving:
            now = utcnow()
            self.record.updated_at = now
            self.record.billed_seconds = (now - self.record.started_at).total_seconds()
            save_worker(self._db, self.record)
