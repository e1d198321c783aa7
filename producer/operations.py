"""What operators do with the queue: nightly ingestion, backfill (or its cost estimate), retry, cancel.

Plain functions over Settings, Redis and MongoDB; the CLI and the HTTP API are thin
shells over them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from pymongo.database import Database
from pymongo.errors import PyMongoError
from redis import Redis
from redis.exceptions import RedisError

from config.errors import QueueError, StoreError
from config.settings import Settings
from producer import notify
from producer.batches.registries import cancel_waiting, existing_batches, failed_batches, requeue_failed
from producer.chunkstore import ChunkStore
from producer.enqueue import EnqueuedJob, batch_queue, enqueue_episodes, vector_spec
from producer.job_status import JobState
from producer.jobs import JobRecords
from producer.models import Episode, VectorSpec
from producer.packing import pack_batches
from producer.sources import EpisodeFilter, TranscriptSource
from producer.streaming import chunk_windows
from producer.tokens import load_tokenizer
from producer.watermark import Mark, Watermark

logger = logging.getLogger(__name__)

# Ledger batches a throughput estimate averages over: recent enough to follow the hardware.
THROUGHPUT_WINDOW = 500
# Why a batch whose rq job is gone (rq-dashboard's Delete, `Job.delete()`) is counted failed.
DELETED_REASON = "deleted outside podembed"


@dataclass
class NightlyRun:
    job_id: str | None
    episodes: int
    chunks: int
    batches: int
    tokens: int
    unchanged: int
    source: str
    refused: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Estimate:
    """What a backfill would cost, from measured (or assumed) tokens per compute-second."""

    model: str
    device: str | None
    tokens_per_second: float
    estimate_from: str  # "ledger" or "default"
    est_gpu_seconds: float
    est_cost_usd: float


@dataclass
class BackfillRun:
    job_id: str | None
    episodes: int
    chunks: int
    batches: int
    tokens: int
    already_embedded: int
    model: str
    force: bool
    dry_run: bool
    refused: list[str]
    estimate: Estimate | None = None
    # The latest interrupted job of the same backfill that this run resumed (its episodes, and those of the
    # runs it resumed, are left to them).
    resumed_from: str | None = None
    # Episode ids given to select by that no selected episode has.
    not_found: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(doc.pop("estimate") or {})
        return doc


@dataclass
class RetryResult:
    job_id: str
    state: JobState
    requeued: list[str] = field(default_factory=list)
    # Failed batches deleted outside podembed: their chunk ids went with them, so they cannot be requeued.
    deleted: list[str] = field(default_factory=list)


@dataclass
class CancelResult:
    job_id: str
    state: JobState
    removed: list[str] = field(default_factory=list)


def nightly(settings: Settings, redis: Redis, db: Database, source: TranscriptSource) -> NightlyRun:
    """Enqueue, as one job, the episodes of `source` that are new or changed since the last run.

    The watermark (every episode's content hash and job, per source and vector key, so a new model
    or instruction takes everything again) advances only once the job is enqueued: a run that fails
    leaves it, and the next run enqueues those episodes again. Episodes of a job that was cancelled
    or failed for good are not past it either.
    """
    spec = vector_spec(settings)
    records = JobRecords(redis, db, settings.result_ttl)
    mark_id = f"{source.key}|{spec.key}"
    watermark = Watermark(db, mark_id).load(records)
    kept: dict[str, Mark] = {}  # the unchanged episodes' marks
    marks: dict[str, Mark] = {}  # the changed episodes', once enqueued
    hashes: dict[str, str] = {}  # the changed episodes' content

    def changed() -> Iterator[Episode]:
        for episode in source.episodes():
            mark = watermark.passed(episode)
            if mark is None:
                hashes[episode.key] = episode.content_sha256()
                yield episode
            else:
                kept[episode.key] = mark

    def enqueued(job: EnqueuedJob, episodes: list[Episode]) -> None:
        marks.update({e.key: Mark(hashes[e.key], job.job_id) for e in episodes})

    job = enqueue_episodes(settings, redis, db, changed(), kind="nightly", spec=spec, run_key=f"nightly|{source.key}",
                           on_window=enqueued)
    # A run that resumed dead ones leaves their episodes to their jobs.
    marks.update({key: Mark(hashes[key], resumed_by) for key, resumed_by in job.resumed.items() if key in hashes})
    if hashes or watermark.legacy:
        watermark.save({**kept, **marks})
    logger.info("nightly %r: job %s, %d new or changed episodes, %d unchanged", source.key, job.job_id,
                job.episodes, len(kept))
    return NightlyRun(job_id=job.job_id, episodes=job.episodes, chunks=job.chunks, batches=job.batches,
                      tokens=job.tokens, unchanged=len(kept), source=source.key, refused=source.refused)


def backfill(
    settings: Settings, redis: Redis, db: Database, source: TranscriptSource, selection: EpisodeFilter, *,
    model: str | None = None, force: bool = False, dry_run: bool = False,
) -> BackfillRun:
    """Embed the selected episodes under `model` (default: the configured one), as one job.

    Chunks whose vector is stored under the target vector key with the same text are left
    out unless `force`. Another model's vectors live in other documents and are never touched.
    A dry run enqueues nothing and carries the estimate instead.
    """
    if model and model != settings.model:
        settings = settings.replace(model=model, model_path=None)
    spec = vector_spec(settings)
    found: set[str] = set()

    def selected() -> Iterator[Episode]:
        for episode in source.episodes(selection.episode_ids):
            if selection.matches(episode):
                if episode.episode_id in selection.episode_ids:
                    found.add(episode.episode_id)
                yield episode

    if dry_run:
        run = _dry_run(settings, db, selected(), spec, force=force, refused=source.refused)
    else:
        # The same command run again after a crash resumes the dead run.
        run_key = f"backfill|{source.key}|{selection.key()}|{force}"
        job = enqueue_episodes(settings, redis, db, selected(), kind="backfill", spec=spec, force=force,
                               run_key=run_key)
        run = BackfillRun(job_id=job.job_id, episodes=job.episodes, chunks=job.chunks - job.skipped,
                          batches=job.batches, tokens=job.tokens, already_embedded=job.skipped, model=spec.model,
                          force=force, dry_run=False, refused=source.refused, resumed_from=job.resumed_from)
    run.not_found = sorted(selection.episode_ids - found)
    return run


def _dry_run(settings: Settings, db: Database, episodes: Iterable[Episode], spec: VectorSpec, *, force: bool,
             refused: list[str]) -> BackfillRun:
    """What a backfill would enqueue, window by window as it would, with the estimate; nothing is written.

    Already embedded are the chunks whose vector is stored and those whose text has a vector under another
    chunk (the worker reuses it): the model sees neither. The batches are those it would enqueue, the
    latter's chunks included (each gets its own document).
    """
    store = ChunkStore(db)
    run = BackfillRun(job_id=None, episodes=0, chunks=0, batches=0, tokens=0, already_embedded=0, model=spec.model,
                      force=force, dry_run=True, refused=refused)
    for window in chunk_windows(settings, episodes, spec):
        chunks = [c for chunked in window for c in chunked.chunks]
        todo = store.to_embed(chunks, spec, force=force)
        reused = set() if force else store.text_stored(todo, spec)
        run.episodes += len(window)
        run.chunks += len(todo) - len(reused)
        run.already_embedded += len(chunks) - len(todo) + len(reused)
        run.tokens += sum(c.n_tokens for c in todo if c.chunk_id not in reused)
        run.batches += len(pack_batches("dry-run", todo, spec, max_tokens=settings.batch_max_tokens,
                                        max_chunks=settings.batch_max_chunks))
    run.estimate = estimate(settings, db, run.chunks, run.tokens, spec)
    return run


def estimate(settings: Settings, db: Database, n_chunks: int, text_tokens: int, spec: VectorSpec) -> Estimate:
    """Compute seconds and cost of embedding `n_chunks` chunks of `text_tokens` tokens, at the throughput
    the ledger measured for the model on the estimate device, or at `default_tokens_per_second`."""
    # The model sees the instruction and special tokens with every chunk; the ledger counts them too.
    prompt_tokens = load_tokenizer(settings).count_with_specials(spec.instruction)
    tokens = text_tokens + n_chunks * prompt_tokens
    device, measured = _measured_throughput(db, spec.model, settings.estimate_device)
    tokens_per_second = measured or settings.default_tokens_per_second
    seconds = tokens / tokens_per_second
    return Estimate(model=spec.model, device=device, tokens_per_second=round(tokens_per_second, 1),
                    estimate_from="ledger" if measured else "default", est_gpu_seconds=round(seconds, 3),
                    # The default throughput is an A10G guess: priced as one.
                    est_cost_usd=round(seconds * settings.price_per_hour(device or "A10G") / 3600, 6))


def retry(settings: Settings, redis: Redis, db: Database, job_id: str) -> RetryResult:
    """Put the job's failed batches back on the queue; run again, it finds none left to requeue.

    A cancelled job is never retried: like a finished one, it has nothing to requeue.
    """
    records = JobRecords(redis, db, settings.result_ttl)
    status = records.status(job_id)
    if status.state is JobState.CANCELLED:
        return RetryResult(job_id=job_id, state=JobState.CANCELLED)
    # The queue the job was enqueued on, even if the settings have named other queues since.
    queue = batch_queue(settings, redis, status.kind, name=status.queue)
    try:
        fail_deleted_batches(records, job_id)
        deleted = [b for b, reason in records.status(job_id).errors.items() if reason == DELETED_REASON]
        failed = failed_batches(queue, records.batch_ids(job_id))
        # Counted failed no more first: a requeue that fails halfway is still in RQ's registry for a rerun.
        records.clear_failed(job_id, failed)
        requeued = requeue_failed(queue, failed)
    except RedisError as exc:
        raise QueueError(f"cannot requeue batches of job {job_id}: {exc}") from exc
    status = records.status(job_id)
    records.save(status)
    logger.info("job %s: requeued %d failed batches", job_id, len(requeued))
    return RetryResult(job_id=job_id, state=status.state, requeued=requeued, deleted=deleted)


def cancel(settings: Settings, redis: Redis, db: Database, job_id: str) -> CancelResult:
    """Take the job's queued batches off the queue (running ones finish) and mark it cancelled.

    A job that already ended is left as it is; cancelling twice removes nothing the second time.
    """
    records = JobRecords(redis, db, settings.result_ttl)
    status = records.status(job_id)
    if status.state in JobState.ENDED - {JobState.CANCELLED}:  # a cancel run again finishes the removal
        return CancelResult(job_id=job_id, state=status.state)
    # Flag first: a worker that dequeues a batch meanwhile runs it, and a rerun finishes the removal.
    records.mark_cancelled(job_id)
    queue = batch_queue(settings, redis, status.kind, name=status.queue)
    removed: dict[str, int] = {}  # batch id -> its chunks
    try:
        for batch_id in records.batch_ids(job_id):
            meta = cancel_waiting(queue, batch_id)
            if meta is not None:
                # Counted at once: a cancel that stops halfway leaves nothing removed uncounted.
                removed[batch_id] = int(meta.get("n_chunks", 0))
                records.count_cancelled(job_id, {batch_id: removed[batch_id]})
        fail_deleted_batches(records, job_id)  # never coming either: the counts add up at once
    except RedisError as exc:
        raise QueueError(f"cannot remove batches of job {job_id} from the queue: {exc}") from exc
    status = records.status(job_id)
    status.state = JobState.CANCELLED  # also where only MongoDB still knows the job
    records.save(status)
    notify.job_ended(settings, records, status)
    logger.info("job %s: cancelled, %d queued batches removed", job_id, len(removed))
    return CancelResult(job_id=job_id, state=status.state, removed=list(removed))


def fail_deleted_batches(records: JobRecords, job_id: str) -> list[str]:
    """Count failed, with DELETED_REASON, the job's open batches whose rq job is gone, and return them.

    rq-dashboard's Delete (`Job.delete()`) takes a batch off its queue and registries with its hash: no
    worker will run it, and its job would wait for it for ever. A batch deleted while a worker runs it is
    counted finished when it ends after all, as its finish replaces the failure.
    """
    open_batches = records.open_batches(job_id)
    there = existing_batches(records.redis, open_batches)
    gone = [b for b, exists in zip(open_batches, there, strict=True) if not exists]
    for batch_id, n_chunks in records.batch_chunks(job_id, gone).items():
        records.mark_failed(job_id, batch_id, n_chunks, DELETED_REASON)
        logger.warning("job %s batch %s: %s (its rq job is gone); counted failed", job_id, batch_id, DELETED_REASON)
    if gone:
        records.save(records.status(job_id))
    return gone


def _measured_throughput(db: Database, model: str, device: str | None) -> tuple[str | None, float | None]:
    """(device, tokens per compute-second) over the latest ledger batches of `model` on `device`
    (None: the device of the model's latest batch); no throughput where none computed anything."""
    query: dict[str, str] = {"model": model} if device is None else {"model": model, "device": device}
    fields = {"device": 1, "n_tokens": 1, "gpu_seconds": 1, "finished_at": 1}
    try:
        # The latest batches only: the ledger grows with every batch ever run.
        latest = db.batches.find(query, fields).sort("finished_at", -1).limit(THROUGHPUT_WINDOW)
        entries = [e for e in latest if e.get("gpu_seconds", 0) > 0]
    except PyMongoError as exc:
        raise StoreError(f"cannot read the ledger {db.name}.batches: {exc}") from exc
    if not entries:
        return device, None
    device = device or entries[0]["device"]  # newest first
    on_device = [e for e in entries if e["device"] == device]
    return device, sum(e["n_tokens"] for e in on_device) / sum(e["gpu_seconds"] for e in on_device)
