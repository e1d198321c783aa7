"""What operators do with the queue: nightly ingestion, backfill (or its cost estimate), retry, cancel.

Plain functions over Settings, Redis and MongoDB; the CLI and the HTTP API are thin
shells over them.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from pymongo.database import Database
from pymongo.errors import PyMongoError
from redis import Redis
from redis.exceptions import RedisError
from rq.exceptions import InvalidJobOperation
from rq.job import Job
from rq.serializers import JSONSerializer

from config.errors import PodembedError, QueueError, StoreError
from config.settings import Settings
from producer.enqueue import batch_queue, chunk_episodes, enqueue_chunks, vector_spec
from producer.jobs import JobRecords, now_iso
from producer.models import Chunk, VectorSpec
from producer.packing import pack_batches
from producer.sources import EpisodeFilter, TranscriptSource
from producer.tokens import load_tokenizer

logger = logging.getLogger(__name__)

# `$in` lists of embedding ids stay well under MongoDB's 16 MB command size.
ID_SLICE = 1000
# Ledger batches a throughput estimate averages over: recent enough to follow the hardware.
THROUGHPUT_WINDOW = 500


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

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(doc.pop("estimate") or {})
        return doc


@dataclass
class RetryResult:
    job_id: str
    state: str
    requeued: list[str] = field(default_factory=list)


@dataclass
class CancelResult:
    job_id: str
    state: str
    removed: list[str] = field(default_factory=list)


def nightly(settings: Settings, redis: Redis, db: Database, source: TranscriptSource) -> NightlyRun:
    """Enqueue, as one job, the episodes of `source` that are new or changed since the last run.

    The watermark (every episode's content hash, per source and vector key, so a new model or
    instruction takes everything again) advances only once the job is enqueued: a run that fails
    leaves it, the next run enqueues those episodes again, and idempotent upserts make that harmless.
    """
    spec = vector_spec(settings)
    mark_id = f"{source.key}|{spec.key}"
    hashes = _read_watermark(db, mark_id)
    changed = []
    seen: dict[str, str] = {}
    for episode in source.episodes():
        seen[episode.episode_id] = episode.content_sha256()
        if hashes.get(episode.episode_id) != seen[episode.episode_id]:
            changed.append(episode)
    chunks = chunk_episodes(settings, changed, spec)
    job = enqueue_chunks(settings, redis, db, chunks=chunks, episodes=len(changed), kind="nightly", spec=spec)
    if changed:
        _write_watermark(db, mark_id, {**hashes, **seen}, job.job_id)
    logger.info("nightly %s: job %s, %d new or changed episodes, %d unchanged", source.key, job.job_id,
                len(changed), len(seen) - len(changed))
    return NightlyRun(job_id=job.job_id, episodes=job.episodes, chunks=job.chunks, batches=job.batches,
                      tokens=job.tokens, unchanged=len(seen) - len(changed), source=source.key,
                      refused=source.refused)


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
    episodes = [e for e in source.episodes(selection.episode_ids) if selection.matches(e)]
    chunks = chunk_episodes(settings, episodes, spec)
    todo = chunks if force else _not_embedded(db, chunks, spec)
    n_episodes = len({c.episode_id for c in todo})
    run = BackfillRun(job_id=None, episodes=n_episodes, chunks=len(todo), batches=0,
                      tokens=sum(c.n_tokens for c in todo), already_embedded=len(chunks) - len(todo),
                      model=spec.model, force=force, dry_run=dry_run, refused=source.refused)
    if dry_run:
        run.batches = len(pack_batches("dry-run", todo, spec, max_tokens=settings.batch_max_tokens,
                                       max_chunks=settings.batch_max_chunks))
        run.estimate = estimate(settings, db, todo, spec)
        return run
    job = enqueue_chunks(settings, redis, db, chunks=todo, episodes=n_episodes, kind="backfill", spec=spec,
                         force=force)
    run.job_id, run.batches = job.job_id, job.batches
    return run


def estimate(settings: Settings, db: Database, chunks: list[Chunk], spec: VectorSpec) -> Estimate:
    """Compute seconds and cost of embedding `chunks`, at the throughput the ledger measured for the
    model on the estimate device, or at `default_tokens_per_second` where it measured none."""
    # The model sees the instruction and special tokens with every chunk; the ledger counts them too.
    prompt_tokens = load_tokenizer(settings).count_with_specials(spec.instruction)
    tokens = sum(c.n_tokens + prompt_tokens for c in chunks)
    device, measured = _measured_throughput(db, spec.model, settings.estimate_device)
    tokens_per_second = measured or settings.default_tokens_per_second
    seconds = tokens / tokens_per_second
    return Estimate(model=spec.model, device=device, tokens_per_second=round(tokens_per_second, 1),
                    estimate_from="ledger" if measured else "default", est_gpu_seconds=round(seconds, 3),
                    # The default throughput is an A10G guess: priced as one.
                    est_cost_usd=round(seconds * settings.price_per_hour(device or "A10G") / 3600, 6))


def retry(settings: Settings, redis: Redis, db: Database, job_id: str) -> RetryResult:
    """Put the job's failed batches back on the queue; run again, it finds none left to requeue."""
    records = JobRecords(redis, db, settings.result_ttl)
    if records.status(job_id).state == "cancelled":
        raise PodembedError(f"job {job_id} was cancelled: nothing to retry")
    registry = batch_queue(settings, redis).failed_job_registry
    requeued: list[str] = []
    try:
        failed = [b for b in records.batch_ids(job_id) if b in registry]
        jobs = [j for j in Job.fetch_many(failed, connection=redis, serializer=JSONSerializer) if j is not None]
        # Counted failed no more first: a requeue that fails halfway is still in RQ's registry for a rerun.
        records.clear_failed(job_id, [j.id for j in jobs])
        for job in jobs:
            try:
                registry.requeue(job)
            except InvalidJobOperation:
                continue  # another retry requeued it meanwhile
            requeued.append(job.id)
    except RedisError as exc:
        raise QueueError(f"cannot requeue batches of job {job_id}: {exc}") from exc
    status = records.status(job_id)
    records.save(status)
    logger.info("job %s: requeued %d failed batches", job_id, len(requeued))
    return RetryResult(job_id=job_id, state=status.state, requeued=requeued)


def cancel(settings: Settings, redis: Redis, db: Database, job_id: str) -> CancelResult:
    """Take the job's queued batches off the queue (running ones finish) and mark it cancelled.

    A job that already ended is left as it is; cancelling twice removes nothing the second time.
    """
    records = JobRecords(redis, db, settings.result_ttl)
    status = records.status(job_id)
    if status.state in ("finished", "partial", "failed"):
        return CancelResult(job_id=job_id, state=status.state)
    # Flag first: a worker that dequeues a batch meanwhile runs it, and a rerun finishes the removal.
    records.mark_cancelled(job_id)
    queue = batch_queue(settings, redis)
    scheduled = queue.scheduled_job_registry
    removed: list[str] = []
    try:
        for batch_id in records.batch_ids(job_id):
            # Off the queue (or the retry schedule) first: once removed, no worker can take it.
            if queue.remove(batch_id) or scheduled.remove(batch_id):
                Job.fetch(batch_id, connection=redis, serializer=JSONSerializer).cancel()
                removed.append(batch_id)
    except RedisError as exc:
        raise QueueError(f"cannot remove batches of job {job_id} from the queue: {exc}") from exc
    status = records.status(job_id)
    status.state = "cancelled"  # also where only MongoDB still knows the job
    records.save(status)
    logger.info("job %s: cancelled, %d queued batches removed", job_id, len(removed))
    return CancelResult(job_id=job_id, state=status.state, removed=removed)


def _not_embedded(db: Database, chunks: list[Chunk], spec: VectorSpec) -> list[Chunk]:
    """Chunks with no vector under `spec`, or one made from other text (the transcript changed)."""
    ids = [spec.embedding_id(c.chunk_id) for c in chunks]
    stored: dict[str, str | None] = {}
    try:
        for start in range(0, len(ids), ID_SLICE):
            for doc in db.embeddings.find({"_id": {"$in": ids[start : start + ID_SLICE]}}, {"text_sha256": 1}):
                stored[doc["_id"]] = doc.get("text_sha256")
    except PyMongoError as exc:
        raise StoreError(f"cannot read {db.name}.embeddings: {exc}") from exc
    return [c for c, i in zip(chunks, ids, strict=True) if stored.get(i, "") != c.text_sha256]


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


def _read_watermark(db: Database, mark_id: str) -> dict[str, str]:
    try:
        doc = db.watermarks.find_one({"_id": mark_id})
    except PyMongoError as exc:
        raise StoreError(f"cannot read watermark {mark_id!r}: {exc}") from exc
    return dict(doc["episodes"]) if doc else {}


def _write_watermark(db: Database, mark_id: str, hashes: dict[str, str], job_id: str | None) -> None:
    # Pairs, not a mapping: episode ids may hold '.' or '$', which field names may not.
    doc = {"_id": mark_id, "episodes": sorted(hashes.items()), "job_id": job_id, "updated_at": now_iso()}
    try:
        # `_id` in the document too: nx-27017 does not take it from the filter on upsert.
        db.watermarks.replace_one({"_id": mark_id}, doc, upsert=True)
    except PyMongoError as exc:
        raise StoreError(f"cannot write watermark {mark_id!r}: {exc}") from exc
