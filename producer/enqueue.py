"""Turn transcripts into one job of many batches on the RQ queue."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from pymongo.database import Database
from redis import Redis
from redis.exceptions import RedisError
from rq import Callback, Queue, Retry
from rq.queue import EnqueueData
from rq.serializers import JSONSerializer

from config.errors import PodembedError, QueueError, TranscriptFormatError
from config.settings import Settings
from producer.chunking import ChunkLimits, chunk_episode
from producer.jobs import JobRecords, NewJob
from producer.models import Batch, Chunk, Episode, VectorSpec
from producer.packing import pack_batches
from producer.parsing import parse_file
from producer.tokens import load_tokenizer

logger = logging.getLogger(__name__)

# What a directory scan picks up; other files can still be named one by one.
TRANSCRIPT_SUFFIXES = {".vtt", ".srt", ".json", ".txt"}

# The worker's job function, by dotted path: the producer never imports torch.
TASK = "worker.tasks.embed_batch"
ON_FAILURE = "worker.tasks.on_batch_failure"
# One transcript giving more chunks than this is unusual (some 18 hours of speech at the default
# chunk size): often a file that is not what it seems, such as a whole archive on one line.
UNUSUAL_CHUNKS = 1000

# Told (done, total, what) as each file is parsed or each episode chunked: long ingests show progress.
Progress = Callable[[int, int, str], None]


@dataclass
class EnqueuedJob:
    job_id: str | None
    episodes: int
    chunks: int
    batches: int
    tokens: int
    refused: list[str] = field(default_factory=list)


def batch_queue(settings: Settings, redis: Redis) -> Queue:
    """The RQ queue of batches, JSON-serialized: a pickled job written by anyone else is refused."""
    return Queue(settings.queue_name, connection=redis, serializer=JSONSerializer)


def vector_spec(settings: Settings, instruction: str | None = None) -> VectorSpec:
    return VectorSpec(
        model=settings.model,
        revision=settings.model_revision,
        instruction=settings.instruction if instruction is None else instruction,
        pool_instruction=settings.pools_instruction(),
        normalize=settings.normalize,
    )


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


def transcript_files(paths: Iterable[Path]) -> list[Path]:
    """Files named, and the transcript files inside directories named (sorted)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(
                p for p in sorted(path.rglob("*"))
                if p.is_file() and p.suffix.lower() in TRANSCRIPT_SUFFIXES and not p.name.startswith(".")
            )
        else:
            files.append(path)
    return files


def parse_files(
    paths: Iterable[Path], podcast: str | None = None, episode_id: str | None = None,
    progress: Progress | None = None,
) -> tuple[list[Episode], list[str]]:
    """Parse every file; bad files are refused with a message and the others go on.

    `episode_id` (for a single file) replaces the file name's stem as the episode's id.
    """
    files = transcript_files(paths)

    def parse(n: int, path: Path) -> Episode:
        if progress:
            progress(n, len(files), f"parsing {path}")
        return parse_file(path, podcast=podcast, episode_id=episode_id)

    return collect_episodes((str(path), partial(parse, n, path)) for n, path in enumerate(files))


def collect_episodes(
    transcripts: Iterable[tuple[str, Callable[[], Episode]]],
) -> tuple[list[Episode], list[str]]:
    """Run each named parse: what fails, or repeats an episode of the same podcast, is refused with a message."""
    episodes: list[Episode] = []
    refused: list[str] = []
    seen: dict[str, str] = {}
    for name, parse in transcripts:
        try:
            episode = parse()
        except TranscriptFormatError as exc:
            refused.append(str(exc))
            continue
        if episode.key in seen:
            refused.append(f"{name}: {describe_episode(episode)} already given by {seen[episode.key]}")
            continue
        seen[episode.key] = name
        episodes.append(episode)
    return episodes, refused


def describe_episode(episode: Episode) -> str:
    show = f" of podcast {episode.podcast!r}" if episode.podcast is not None else ""
    return f"episode id {episode.episode_id!r}{show}"


def chunk_episodes(
    settings: Settings, episodes: list[Episode], spec: VectorSpec, progress: Progress | None = None,
) -> list[Chunk]:
    tokenizer = load_tokenizer(settings)
    limits = ChunkLimits(settings.chunk_tokens, settings.chunk_overlap_tokens, spec.instruction)
    chunks: list[Chunk] = []
    for n, episode in enumerate(episodes):
        if progress:
            progress(n, len(episodes), f"chunking {episode.source or episode.episode_id}")
        ours = chunk_episode(episode, tokenizer, limits)
        if len(ours) > UNUSUAL_CHUNKS:
            logger.warning("%s gave %d chunks, an unusual number for one episode (over %d): is it one transcript?",
                           episode.source or describe_episode(episode), len(ours), UNUSUAL_CHUNKS)
        chunks.extend(ours)
    return chunks


def enqueue_chunks(
    settings: Settings, redis: Redis, db: Database, *, chunks: list[Chunk], episodes: int, kind: str,
    spec: VectorSpec, force: bool = False,
) -> EnqueuedJob:
    """Create the job record, then enqueue one RQ job per batch; no chunks, no job.

    `force` makes the worker embed every chunk even where its vector is stored.
    """
    if not chunks:
        return EnqueuedJob(job_id=None, episodes=episodes, chunks=0, batches=0, tokens=0)
    job_id = new_job_id()
    batches = pack_batches(
        job_id, chunks, spec, max_tokens=settings.batch_max_tokens, max_chunks=settings.batch_max_chunks, force=force
    )
    records = JobRecords(redis, db, settings.result_ttl)
    job = NewJob(
        job_id=job_id, kind=kind, model=spec.model, instruction=spec.instruction, vector_key=spec.key,
        episodes=episodes, chunks_total=len(chunks), batch_ids=[b.batch_id for b in batches],
    )
    queue = batch_queue(settings, redis)
    try:
        with redis.pipeline(transaction=True) as pipe:
            records.create(job, pipe)
            queue.enqueue_many([_job_data(settings, batch) for batch in batches], pipeline=pipe)
            pipe.execute()
    except RedisError as exc:
        raise QueueError(f"cannot enqueue job {job_id} on {queue.name!r}: {exc}") from exc
    records.save(records.status(job_id))
    logger.info("job %s: enqueued %d chunks in %d batches", job_id, len(chunks), len(batches))
    return EnqueuedJob(
        job_id=job_id, episodes=episodes, chunks=len(chunks), batches=len(batches),
        tokens=sum(c.n_tokens for c in chunks),
    )


def _job_data(settings: Settings, batch: Batch) -> EnqueueData:
    retry = Retry(max=len(settings.retry_intervals), interval=list(settings.retry_intervals)) \
        if settings.retry_intervals else None
    return Queue.prepare_data(
        TASK,
        args=(batch.to_payload(),),
        job_id=batch.batch_id,
        timeout=settings.job_timeout,
        result_ttl=settings.result_ttl,
        failure_ttl=settings.result_ttl,
        retry=retry,
        on_failure=Callback(ON_FAILURE),
        description=f"job {batch.job_id} batch {batch.batch_id}: {len(batch.chunks)} chunks",
        meta={"podembed_job": batch.job_id, "n_chunks": len(batch.chunks), "n_tokens": batch.n_tokens},
    )


def ingest(
    settings: Settings, redis: Redis, db: Database, episodes: list[Episode], *, kind: str,
    instruction: str | None = None, progress: Progress | None = None,
) -> EnqueuedJob:
    """Chunk and enqueue parsed episodes as one job."""
    if not episodes:
        raise PodembedError("nothing to ingest: no transcript was accepted")
    spec = vector_spec(settings, instruction)
    chunks = chunk_episodes(settings, episodes, spec, progress)
    return enqueue_chunks(settings, redis, db, chunks=chunks, episodes=len(episodes), kind=kind, spec=spec)
