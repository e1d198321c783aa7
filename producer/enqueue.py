"""Turn transcripts into one job of many batches on the RQ queue."""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from pymongo.database import Database
from redis import Redis
from redis.exceptions import RedisError
from rq import Callback, Queue, Retry
from rq.queue import EnqueueData
from rq.serializers import JSONSerializer

from config.errors import EnqueueInterrupted, JobNotFoundError, PodembedError, QueueError, TranscriptFormatError
from config.settings import Settings
from producer import notify
from producer.chunkstore import ChunkStore
from producer.connections import check_mongo
from producer.jobs import JobRecords, NewJob, Window
from producer.models import Batch, Episode, VectorSpec
from producer.packing import pack_batches
from producer.parsing import parse_file
from producer.streaming import ChunkedEpisode, chunk_windows

logger = logging.getLogger(__name__)

# What a directory scan picks up; other files can still be named one by one.
TRANSCRIPT_SUFFIXES = {".vtt", ".srt", ".json", ".txt"}

# A command that can be resumed keeps here, until a run of it is wholly enqueued, the ids of the jobs of its
# runs that stopped short and of the one running now (oldest first, separated by spaces).
RUN_PREFIX = "podembed:run:"

# The worker's job function, by dotted path: the producer never imports torch.
TASK = "worker.tasks.embed_batch"
ON_FAILURE = "worker.tasks.on_batch_failure"


@dataclass
class EnqueuedJob:
    job_id: str | None
    episodes: int
    chunks: int
    batches: int
    # Tokens queued for the model (skipped chunks are not).
    tokens: int
    # Chunks whose vector was already stored: counted done, never queued.
    skipped: int = 0
    # The latest interrupted job of the same command this run resumed, and the keys of the episodes that
    # it and the runs it resumed had enqueued, each with its job (left to them).
    resumed_from: str | None = None
    resumed: dict[str, str] = field(default_factory=dict, repr=False)


def batch_queue(settings: Settings, redis: Redis, kind: str = "ingest", *, name: str | None = None) -> Queue:
    """The RQ queue of the batches of `kind`'s jobs (or the queue `name`), JSON-serialized: a pickled job
    written by anyone else is refused."""
    return Queue(name or settings.queue_for(kind), connection=redis, serializer=JSONSerializer)


def batch_queues(settings: Settings, redis: Redis) -> list[Queue]:
    """Every batch queue, highest priority first."""
    return [batch_queue(settings, redis, name=name) for name in settings.queue_names()]


def vector_spec(settings: Settings, instruction: str | None = None) -> VectorSpec:
    return VectorSpec(
        model=settings.model,
        revision=settings.model_revision,
        instruction=settings.instruction if instruction is None else instruction,
        pool_instruction=settings.pools_instruction(),
        normalize=settings.normalize,
        dtype=settings.vector_dtype,
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
) -> tuple[list[Episode], list[str]]:
    """Parse every file; bad files are refused with a message and the others go on.

    `episode_id` (for a single file) replaces the file name's stem as the episode's id.
    """
    refused: list[str] = []
    return list(stream_files(paths, refused, podcast=podcast, episode_id=episode_id)), refused


def stream_files(
    paths: Iterable[Path], refused: list[str], *, podcast: str | None = None, episode_id: str | None = None,
) -> Iterator[Episode]:
    """`parse_files` one file at a time, adding refusals to `refused` as they happen."""
    return stream_episodes(((str(path), partial(parse_file, path, podcast=podcast, episode_id=episode_id))
                            for path in transcript_files(paths)), refused)


def collect_episodes(
    transcripts: Iterable[tuple[str, Callable[[], Episode]]],
) -> tuple[list[Episode], list[str]]:
    """Run each named parse: what fails, or repeats an episode of the same podcast, is refused with a message."""
    refused: list[str] = []
    return list(stream_episodes(transcripts, refused)), refused


def stream_episodes(transcripts: Iterable[tuple[str, Callable[[], Episode]]], refused: list[str]) -> Iterator[Episode]:
    """`collect_episodes` one transcript at a time, adding refusals to `refused` as they happen."""
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
        yield episode


def describe_episode(episode: Episode) -> str:
    show = f" of podcast {episode.podcast!r}" if episode.podcast is not None else ""
    return f"episode id {episode.episode_id!r}{show}"


class JobStream:
    """One job, enqueued window by window as its episodes are chunked.

    The job is recorded (MongoDB first, then Redis) when its first window arrives. Each window's
    chunks whose vector is already stored under the spec are counted skipped and never queued;
    the others are written to MongoDB `chunks`, packed, and enqueued with the window's counts in
    one Redis transaction, so a window is on the queue whole or not at all.
    """

    def __init__(self, settings: Settings, redis: Redis, db: Database, *, kind: str, spec: VectorSpec,
                 force: bool = False) -> None:
        self.settings = settings
        self.redis = redis
        self.records = JobRecords(redis, db, settings.result_ttl)
        self.store = ChunkStore(db)
        self.queue = batch_queue(settings, redis, kind)
        self.kind = kind
        self.spec = spec
        self.force = force
        self.job = EnqueuedJob(job_id=None, episodes=0, chunks=0, batches=0, tokens=0)
        self.run_key: str | None = None
        # The jobs of the earlier runs of the same command that stopped short, oldest first.
        self.stopped_short: list[str] = []

    def resume(self, run_key: str) -> dict[str, str]:
        """The episodes that the interrupted runs of the same command (if any) enqueued, each with its job.

        The new job leaves them to those jobs, whose batches are on the queue or done: however many
        runs in a row stopped short, each episode is enqueued by one of them or by this one.
        """
        # Under this job's vector key: the same command under another model is another run.
        self.run_key = RUN_PREFIX + hashlib.sha256(f"{run_key}|{self.spec.key}".encode()).hexdigest()[:32]
        try:
            prior = self.redis.get(self.run_key)
            if prior is None:
                return {}
            chain = prior.decode().split()
            latest = chain[-1]
            if self.records.producer_alive(latest):
                raise PodembedError(f"job {latest} is still being enqueued for the same selection by another "
                                    "process: wait for it, or cancel it")
            try:
                if self.records.status(latest).enqueue_done:
                    return {}
            except JobNotFoundError:
                return {}
            self.records.release_producer(latest)  # known dead: its job shows `interrupted` from now on
            for job_id in chain:
                self.job.resumed.update(dict.fromkeys(self.records.enqueued_episodes(job_id), job_id))
        except RedisError as exc:
            raise QueueError(f"cannot read the state of earlier runs from Redis: {exc}") from exc
        self.stopped_short, self.job.resumed_from = chain, latest
        logger.info("resuming jobs %s: their %d enqueued episodes are left to them", " ".join(chain),
                    len(self.job.resumed))
        return self.job.resumed

    def open(self) -> str:
        if self.job.job_id is None:
            # A URI the server cannot serve (credentials against nx-27017) fails here, before anything is queued.
            check_mongo(self.settings, self.records.db)
            job_id = new_job_id()
            self.records.create(NewJob(job_id=job_id, kind=self.kind, queue=self.queue.name, model=self.spec.model,
                                       instruction=self.spec.instruction, vector_key=self.spec.key,
                                       notify_url=self.settings.notify_url))
            if self.run_key is not None:
                try:
                    self.redis.set(self.run_key, " ".join([*self.stopped_short, job_id]), ex=self.settings.result_ttl)
                except RedisError as exc:
                    raise QueueError(f"cannot record job {job_id} in Redis: {exc}") from exc
            self.job.job_id = job_id
        return self.job.job_id

    def add(self, window: list[ChunkedEpisode]) -> bool:
        """Enqueue one window; False (nothing enqueued) once the job has been cancelled."""
        chunks = [c for chunked in window for c in chunked.chunks]
        if not chunks:
            return True
        job_id = self.open()
        if self.records.cancelled(job_id):
            return False
        todo = self.store.to_embed(chunks, self.spec, force=self.force)
        skipped = len(chunks) - len(todo)
        self.store.write(todo)
        batches = pack_batches(job_id, todo, self.spec, max_tokens=self.settings.batch_max_tokens,
                               max_chunks=self.settings.batch_max_chunks, force=self.force,
                               first_index=self.job.batches)
        counts = Window(batches={b.batch_id: len(b.chunks) for b in batches}, chunks=len(chunks), skipped=skipped,
                        episode_keys=[chunked.episode.key for chunked in window])
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                self.records.add_window(job_id, counts, pipe)
                if batches:
                    self.queue.enqueue_many([_job_data(self.settings, b) for b in batches], pipeline=pipe)
                failed = [r for r in pipe.execute(raise_on_error=False) if isinstance(r, Exception)]
            if failed:
                # Redis ran the rest of the transaction: a resumed run must not take these episodes as enqueued.
                self.records.forget_episodes(job_id, counts.episode_keys)
                raise failed[0]
        except RedisError as exc:
            raise QueueError(f"cannot enqueue job {job_id} on {self.queue.name!r}: {exc}") from exc
        self.job.episodes += len(window)
        self.job.chunks += len(chunks)
        self.job.batches += len(batches)
        self.job.tokens += sum(c.n_tokens for c in todo)
        self.job.skipped += skipped
        return True

    def abandon(self) -> None:
        """Leave the job `interrupted` now (this process stops short): the same command resumes it."""
        if self.job.job_id is not None:
            self.records.release_producer(self.job.job_id)

    def interrupted(self) -> EnqueueInterrupted:
        """The error of a run stopped by Ctrl-C after its job was recorded: what it enqueued, and how to go on."""
        job = self.job
        return EnqueueInterrupted(f"job {job.job_id} interrupted: {job.episodes} episodes ({job.chunks} chunks) were "
                                  "enqueued and still run; run the same command again to enqueue the rest (it "
                                  "resumes: no chunk is queued twice)")

    def close(self) -> EnqueuedJob:
        """Mark the job wholly enqueued (a job with no chunks was never recorded)."""
        if self.job.job_id is not None:
            if self.run_key is not None:
                try:
                    self.redis.delete(self.run_key)
                except RedisError as exc:
                    raise QueueError(f"cannot record job {self.job.job_id} enqueued in Redis: {exc}") from exc
            # Every chunk skipped, or the workers done already: the job ends here.
            notify.job_ended(self.settings, self.records, self.records.finish_enqueue(self.job.job_id))
            logger.info("job %s: enqueued %d chunks (%d skipped) in %d batches", self.job.job_id, self.job.chunks,
                        self.job.skipped, self.job.batches)
        return self.job


def enqueue_episodes(
    settings: Settings, redis: Redis, db: Database, episodes: Iterable[Episode], *, kind: str, spec: VectorSpec,
    force: bool = False, run_key: str | None = None,
    on_window: Callable[[EnqueuedJob, list[Episode]], None] | None = None,
) -> EnqueuedJob:
    """Chunk and enqueue `episodes` as one job while they are read; no chunks, no job.

    `force` queues every chunk even where its vector is stored (the worker embeds it again).
    `run_key` names the command: run again after a crash, it resumes where the dead run stopped.
    `on_window` is called with the job's running counts and the episodes of each window enqueued.
    Chunking (this thread and its pool) and storing (a lane of its own) overlap by one window.
    """
    notify.check_target(settings)
    stream = JobStream(settings, redis, db, kind=kind, spec=spec, force=force)
    taken = stream.resume(run_key) if run_key is not None else {}
    todo = (e for e in episodes if e.key not in taken)
    try:
        with EnqueueLane(stream, on_window) as lane:
            for window in chunk_windows(settings, todo, spec):
                if not lane.put(window):
                    logger.warning("job %s was cancelled while it was being enqueued: stopped", stream.job.job_id)
                    break
    except KeyboardInterrupt:
        stream.abandon()
        if stream.job.job_id is None:
            raise
        raise stream.interrupted() from None
    except BaseException:
        stream.abandon()
        raise
    return stream.close()


_END = object()


class EnqueueLane:
    """A thread that stores and enqueues windows in order while the next one is chunked.

    Its queue holds one window: memory stays bounded by two windows in flight. An error in
    the lane stops it and is raised once, in the thread that owns the stream.
    """

    def __init__(self, stream: JobStream, on_window: Callable[[EnqueuedJob, list[Episode]], None] | None) -> None:
        self.stream = stream
        self.on_window = on_window
        self.windows: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.cancelled = False
        self.thread = threading.Thread(target=self._run, name="enqueue", daemon=True)

    def __enter__(self) -> EnqueueLane:
        self.thread.start()
        return self

    def put(self, window: list[ChunkedEpisode]) -> bool:
        """Hand a window over; False once the job was cancelled (nothing more is enqueued)."""
        self._raise()
        if self.cancelled:
            return False
        while self.thread.is_alive():
            try:
                self.windows.put(window, timeout=0.5)
                return True
            except queue.Full:
                continue
        self._raise()
        return not self.cancelled

    def __exit__(self, *exc: object) -> None:
        while self.thread.is_alive():
            try:
                self.windows.put(_END, timeout=0.5)
                break
            except queue.Full:
                continue
        self.thread.join()
        if exc[0] is None:
            self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _run(self) -> None:
        try:
            while (window := self.windows.get()) is not _END:
                if self.cancelled:
                    continue
                if not self.stream.add(window):
                    self.cancelled = True
                elif self.on_window is not None:
                    self.on_window(self.stream.job, [chunked.episode for chunked in window])
        except BaseException as exc:  # surfaced by the owner's next put or exit
            self.error = exc


def _job_data(settings: Settings, batch: Batch) -> EnqueueData:
    retry = Retry(max=len(settings.retry_intervals), interval=list(settings.retry_intervals)) \
        if settings.retry_intervals else None
    return Queue.prepare_data(
        TASK,
        args=(batch.ticket().to_payload(),),
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
    settings: Settings, redis: Redis, db: Database, episodes: Iterable[Episode], *, kind: str,
    instruction: str | None = None, run_key: str | None = None,
    on_window: Callable[[EnqueuedJob, list[Episode]], None] | None = None,
) -> EnqueuedJob:
    """Chunk and enqueue parsed episodes as one job, as they come (see `enqueue_episodes`)."""
    return enqueue_episodes(settings, redis, db, episodes, kind=kind, spec=vector_spec(settings, instruction),
                            run_key=run_key, on_window=on_window)
