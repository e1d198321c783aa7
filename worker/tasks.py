"""The batch in three stages (prepare, compute, store), the RQ entry point, and the failure callback.

They run in a worker process that holds the model (no fork), so the model and the
Mongo client live in a process-wide context. The lanes of `worker.lanes` run the stages of
different batches at once; `embed_batch` runs them in series for a plain rq worker.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import numpy as np
from bson.binary import Binary
from redis import Redis
from redis.client import Pipeline

from config.errors import EmbeddingError, PayloadError, QueueError, StoreError
from config.settings import Settings, redact_url
from producer import notify
from producer.chunkstore import ChunkStore
from producer.connections import mongo_database, redis_client
from producer.enqueue import vector_spec
from producer.jobs import ALREADY_COUNTED, COUNTED, JobRecords
from producer.models import Batch, BatchTicket, Chunk, VectorSpec, text_key
from worker.embedder import Embedder, EncodeStats, get_embedder
from worker.store import LedgerEntry, VectorStore, to_bson_vector, vector_doc

logger = logging.getLogger(__name__)

STATUS_SAVE_SECONDS = 5.0  # how often a running job's status is copied to MongoDB


@dataclass
class WorkerContext:
    """What a worker process builds once and every batch uses."""

    settings: Settings
    records: JobRecords
    store: VectorStore
    chunks: ChunkStore
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    # Reports progress within a batch (chunks embedded per forward pass) off the compute lane, and copies
    # a job's status to MongoDB off the store lane.
    reporter: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="progress"))
    # When each running job's status was last saved to MongoDB (time.monotonic()).
    status_saved: dict[str, float] = field(default_factory=dict)

    def embedder(self, spec: VectorSpec) -> Embedder:
        """The worker's one model; a batch that names another fails at once (loading a second
        model inside a drain would double the memory and the cold start of every container)."""
        s = self.settings
        serves = vector_spec(s)
        if spec.weights != serves.weights:
            raise EmbeddingError(
                f"batch needs model {spec.model!r} (revision {spec.revision}, pool instruction "
                f"{spec.pool_instruction}) but this worker serves {serves.model!r} (revision {serves.revision}, "
                f"pool instruction {serves.pool_instruction}); run a worker with PODEMBED_MODEL={spec.model}")
        embedder = get_embedder(s.model_source(), revision=spec.revision, pool_instruction=spec.pool_instruction,
                                device=s.device, micro_batch_size=s.micro_batch_size,
                                max_forward_tokens=s.max_forward_tokens)
        s.price_per_hour(embedder.device_name)  # a device with no price stops the worker at start
        return embedder

    def keep_status(self, job_id: str, *, ended: bool) -> None:
        """Save the job's status to MongoDB once it ended (or when a batch counted before is run
        again), else at most every STATUS_SAVE_SECONDS: the copy `status` reads once Redis forgot
        the job lags by seconds while the job runs, and most batches pay no round trip for it."""
        now = time.monotonic()
        if not ended and now - self.status_saved.get(job_id, -math.inf) < STATUS_SAVE_SECONDS:
            return
        # Entries past the interval decide nothing: dropped, a long-lived worker keeps only recent jobs.
        self.status_saved = {j: t for j, t in self.status_saved.items() if now - t < STATUS_SAVE_SECONDS}
        if ended:
            self.status_saved.pop(job_id, None)
        else:
            self.status_saved[job_id] = now
        try:
            status = self.records.status(job_id)
            self.records.save(status)
            notify.job_ended(self.settings, self.records, status)
        except (QueueError, StoreError) as exc:
            # The batch is counted and finished already: failing it now would run it again.
            logger.warning("job %s: status not copied to MongoDB (the next batch or `podembed status` may): %s",
                           job_id, exc)

    def settle(self) -> None:
        """Wait until the reports and status copies handed to the reporter thread are done, and the
        notifications of the jobs they ended."""
        self.reporter.submit(lambda: None).result()
        notify.flush()


_context: WorkerContext | None = None


def init_context(settings: Settings, redis: Redis | None = None) -> WorkerContext:
    """Build the process-wide context (the worker loop and Modal containers call this at start)."""
    global _context
    db = mongo_database(settings)
    store = VectorStore(db)
    store.ensure_indexes()
    chunks = ChunkStore(db)
    chunks.ensure_retention(settings.chunk_retention)
    _context = WorkerContext(
        settings=settings,
        records=JobRecords(redis or redis_client(settings), db, settings.result_ttl),
        store=store,
        chunks=chunks,
    )
    return _context


def current_context() -> WorkerContext:
    # A process started by plain `rq worker` has not built one: the environment is its edge.
    return _context or init_context(Settings.from_env())


@dataclass
class BatchResult:
    job_id: str
    batch_id: str
    embedded: int
    skipped: int
    gpu_seconds: float
    cost_usd: float
    device: str

    def to_dict(self) -> dict:
        return self.__dict__.copy()


@dataclass
class PreparedBatch:
    """A batch loaded and looked up: which texts need the model, which reuse a stored vector."""

    batch: Batch
    started_at: datetime
    began: float  # time.perf_counter() when the batch was taken
    # Unique texts to embed (text key, the chunks holding it), and documents reusing stored vectors.
    groups: list[tuple[str, list[Chunk]]]
    reused: list[dict]
    skipped: int
    store_wait: float  # seconds on MongoDB so far
    # Counted by an earlier run (killed between its counters and rq's finish, or taken again by
    # rq's abandoned-job cleanup while it still ran): that run's ledger entry stays.
    counted: bool


@dataclass
class ComputedBatch:
    """A batch after its forward passes: one vector per group, in group order."""

    prepared: PreparedBatch
    vectors: np.ndarray
    stats: EncodeStats
    embedder: Embedder


def prepare_batch(ctx: WorkerContext, ticket: BatchTicket, claimed: object) -> PreparedBatch:
    """Read the chunks of a claimed batch (one query) and look up which of its texts already have a vector.

    `claimed`: the answer to its claim (`JobRecords.claim`), sent with the batch's registration as
    started. A ticket naming a job or batch that does not exist is a PayloadError, before anything
    is stored.
    """
    started_at = datetime.now(UTC)
    began = time.perf_counter()
    counted = ctx.records.claimed(ticket.job_id, ticket.batch_id, claimed)
    batch = Batch(job_id=ticket.job_id, batch_id=ticket.batch_id, spec=ticket.spec,
                  chunks=ctx.chunks.load(ticket.chunk_ids, ticket.spec), force=ticket.force)
    spec = batch.spec
    keys = [text_key(c.text, spec) for c in batch.chunks]
    waited = time.perf_counter()
    # A forced batch (`backfill --force`) embeds every text again and overwrites its vectors.
    existing = {} if batch.force else ctx.store.existing(sorted(set(keys)), other_than_batch=batch.batch_id)
    store_wait = time.perf_counter() - waited

    # Chunks whose text already has a vector under this spec reuse it (counted skipped);
    # equal texts inside the batch are embedded once.
    dim = ctx.embedder(spec).dim
    now = datetime.now(UTC)
    reused: list[dict] = []
    to_embed: dict[str, list[Chunk]] = {}
    skipped = 0
    for chunk, key in zip(batch.chunks, keys, strict=True):
        if key not in existing:
            to_embed.setdefault(key, []).append(chunk)
            continue
        skipped += 1
        ids, vector = existing[key]
        if spec.embedding_id(chunk.chunk_id) not in ids:
            reused.append(vector_doc(chunk, spec, key, Binary(vector, 9), dim=dim, job_id=batch.job_id,
                                     batch_id=batch.batch_id, embedded_at=now))
    return PreparedBatch(batch=batch, started_at=started_at, began=began, groups=list(to_embed.items()),
                         reused=reused, skipped=skipped, store_wait=store_wait, counted=counted)


def reuse_vectors(prepared: PreparedBatch, vectors: dict[str, Binary], *, dim: int) -> PreparedBatch:
    """The batch with its texts that have a vector in `vectors` (text key -> vector) reusing it, counted skipped,
    as if its lookup had found them stored; a forced batch embeds every text again."""
    batch = prepared.batch
    found = [(key, chunks) for key, chunks in prepared.groups if key in vectors]
    if batch.force or not found:
        return prepared
    now = datetime.now(UTC)
    reused = [vector_doc(chunk, batch.spec, key, vectors[key], dim=dim, job_id=batch.job_id, batch_id=batch.batch_id,
                         embedded_at=now) for key, chunks in found for chunk in chunks]
    return replace(prepared, groups=[g for g in prepared.groups if g[0] not in vectors],
                   reused=prepared.reused + reused, skipped=prepared.skipped + len(reused))


def compute_batch(ctx: WorkerContext, prepared: PreparedBatch) -> ComputedBatch:
    """The forward passes, and nothing else: no socket is touched here."""
    spec = prepared.batch.spec
    embedder = ctx.embedder(spec)
    prompt_tokens = embedder.prompt_tokens(spec.instruction)
    groups = prepared.groups
    batch = prepared.batch

    def report(indices: list[int], _: np.ndarray) -> None:
        # Handed to the reporter thread: the job's progress moves per forward pass, the model never waits.
        ctx.reporter.submit(ctx.records.mark_stored, batch.job_id, batch.batch_id,
                            sum(len(groups[i][1]) for i in indices))

    vectors, stats = embedder.encode(
        [chunks[0].text for _, chunks in groups],
        [chunks[0].n_tokens + prompt_tokens for _, chunks in groups],
        instruction=spec.instruction,
        normalize=spec.normalize,
        on_vectors=report,
    )
    return ComputedBatch(prepared=prepared, vectors=vectors, stats=stats, embedder=embedder)


def store_batch(ctx: WorkerContext, computed: ComputedBatch,
                finish: Callable[[Pipeline, BatchResult], None] | None = None) -> BatchResult:
    """Vectors (one bulk write), the ledger entry, then the job's counters in one Redis transaction,
    with rq's own finish of the batch when `finish` adds it there. The copy of the job's status to
    MongoDB (`keep_status`) goes to the reporter thread: `WorkerContext.settle` waits for it."""
    prepared, stats, embedder = computed.prepared, computed.stats, computed.embedder
    batch, spec = prepared.batch, prepared.batch.spec
    embedded_at = datetime.now(UTC)
    docs = prepared.reused + [
        vector_doc(chunk, spec, key, to_bson_vector(vector, spec.dtype), dim=embedder.dim, job_id=batch.job_id,
                   batch_id=batch.batch_id, embedded_at=embedded_at)
        for (key, chunks), vector in zip(prepared.groups, computed.vectors, strict=True)
        for chunk in chunks
    ]
    waited = time.perf_counter()
    ctx.store.upsert(docs)
    # The claim check is consumed: the texts are in `embeddings` now (a rerun of this batch reads them there).
    ctx.chunks.consume(batch.chunks)
    store_wait = prepared.store_wait + time.perf_counter() - waited

    embedded = sum(len(chunks) for _, chunks in prepared.groups)
    # Priced by the device the batch ran on: a CPU batch at the CPU rate, not the GPU's.
    cost = stats.seconds * ctx.settings.price_per_hour(embedder.device_name) / 3600
    if not prepared.counted:
        ctx.store.record(LedgerEntry(
            job_id=batch.job_id, batch_id=batch.batch_id, model=spec.model, vector_key=spec.key,
            n_chunks=len(batch.chunks), n_embedded=embedded, n_skipped=prepared.skipped,
            n_tokens=stats.n_tokens, padded_tokens=stats.padded_tokens, gpu_seconds=stats.seconds,
            store_wait_seconds=store_wait, wall_seconds=time.perf_counter() - prepared.began,
            device=embedder.device_name, worker=ctx.name, started_at=prepared.started_at,
            finished_at=datetime.now(UTC), cost_usd=cost,
        ))
    result = BatchResult(job_id=batch.job_id, batch_id=batch.batch_id, embedded=embedded, skipped=prepared.skipped,
                         gpu_seconds=stats.seconds, cost_usd=cost, device=embedder.device_name)
    with ctx.records.redis.pipeline(transaction=True) as pipe:
        ctx.records.count_finished(pipe, batch.job_id, batch.batch_id, embedded=embedded, skipped=prepared.skipped,
                                   gpu_seconds=stats.seconds, cost_usd=cost, device=embedder.device_name,
                                   model=spec.model, tokens=stats.n_tokens)
        if finish is not None:
            finish(pipe, result)
        outcome = pipe.execute()[0]
    ctx.reporter.submit(ctx.keep_status, batch.job_id, ended=outcome != COUNTED)
    logger.info("job %s batch %s: %d embedded, %d skipped, %.2fs compute on %s%s", batch.job_id, batch.batch_id,
                embedded, prepared.skipped, stats.seconds, embedder.device_name,
                " (already counted)" if outcome == ALREADY_COUNTED else "")
    return result


def embed_batch(payload: dict) -> dict:
    """RQ entry point (a plain rq worker): the three stages in series; the lanes of `worker.lanes` overlap them."""
    ctx = current_context()
    ticket = BatchTicket.from_payload(payload)
    with ctx.records.redis.pipeline() as pipe:
        ctx.records.claim(pipe, ticket.job_id, ticket.batch_id)
        (claimed,) = pipe.execute()
    result = store_batch(ctx, compute_batch(ctx, prepare_batch(ctx, ticket, claimed)))
    ctx.settle()
    return result.to_dict()


def on_batch_failure(batch, connection, exc_type, exc_value, traceback) -> None:  # noqa: ANN001 (RQ's signature)
    """RQ failure callback (`batch`: the batch's rq job): a batch with no retries left is counted failed,
    with its reason."""
    records = current_context().records
    batch_id, job_id = batch.id, batch.meta.get("podembed_job", "")
    # The reason is shown by `status` and the HTTP API: a library's message may hold a URL.
    reason = redact_url(f"{exc_type.__name__}: {exc_value}")
    if not records.has_batch(job_id, batch_id):
        # Written by someone else into Redis: it stays in the failed registry, and no job counts it.
        logger.error("batch %s: not a batch of any job, failed: %s", batch_id, reason)
        batch.retries_left = 0
        return
    if issubclass(exc_type, EmbeddingError | PayloadError):
        # The model refused this batch (a text over the cap, non-finite vectors), or its payload is not
        # one podembed wrote: trying again gives the same answer, so it fails now; RQ reads
        # `retries_left` after this callback.
        batch.retries_left = 0
    if batch.should_retry:
        records.mark_retrying(job_id, batch_id)
        logger.warning("job %s batch %s: %s; will retry (%d left)", job_id, batch_id, reason, batch.retries_left)
        return
    records.mark_failed(job_id, batch_id, int(batch.meta.get("n_chunks", 0)), reason)
    status = records.status(job_id)
    records.save(status)
    notify.job_ended(current_context().settings, records, status)
    logger.error("job %s batch %s: failed for good: %s", job_id, batch_id, reason)
