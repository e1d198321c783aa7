"""The user-facing job: live counters in Redis, history in MongoDB `jobs`.

A job groups many batches (RQ jobs). Redis holds one hash of counters per job and
a few sets of batch ids; a batch's counters are added by one Lua script that first
adds the batch to the `done` set, so a batch that runs twice (a retry after a crash,
say) is counted once.

A job is enqueued in windows while its producer reads: its totals grow with each
window, and it can finish only once `enqueue_done` is set. The producer keeps a key
alive while it works; a job whose producer died before the end is `interrupted`.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NamedTuple

from pymongo.database import Database
from pymongo.errors import PyMongoError
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError

from config.errors import JobNotFoundError, PayloadError, QueueError, StoreError
from config.settings import redact_url
from producer import scripts
from producer.job_status import BatchCounts, ChunkCounts, JobState, JobStatus, NotifyStatus, job_state, notify_status
from producer.models import BATCH_ID, JOB_ID

logger = logging.getLogger(__name__)

KEY_PREFIX = "podembed:job:"
JOBS_INDEX = "podembed:jobs"
# Running totals of every batch counted, for /metrics: `{counter}\t{device}\t{model}` -> value (never expires).
TOTALS_KEY = "podembed:totals"
TOTALS = ("batches", "embedded", "skipped", "tokens", "gpu_seconds", "cost_usd")
# A producer refreshes its job's key at every window; one silent for this long has died.
PRODUCER_TTL_SECONDS = 120

# The job hash's fields of its end's delivery (`producer.notify`), besides `notify_url`.
NOTIFY_DELIVERY_FIELDS = ("notify_state", "notify_attempts", "notify_error")

# What `count_finished`'s script answers.
ALREADY_COUNTED, COUNTED, JOB_ENDED = 0, 1, 2


class JobKeys(NamedTuple):
    """A job's Redis keys, by name; the first ten expire together (`producer.scripts.JOB_KEYS`)."""

    record: str  # hash: kind, model, counters, `enqueue_done`, `cancelled`, `finished_at`, the webhook's fields
    done: str  # set: the batches counted finished
    running: str  # set: the batches running
    failed: str  # hash: failed batch -> its chunks
    errors: str  # hash: failed batch -> its reason
    batches: str  # list: its batch ids, in enqueue order
    episodes: str  # set: the keys of the episodes it wholly enqueued
    cancelled: str  # hash: cancelled batch -> its chunks
    progress: str  # hash: running batch -> chunks stored so far
    sizes: str  # hash: batch -> its chunks
    producer: str  # its producer's name (host:pid) while it works, refreshed within PRODUCER_TTL_SECONDS
    totals: str = TOTALS_KEY  # every job's batches counted, for /metrics

    @classmethod
    def of(cls, job_id: str) -> JobKeys:
        base = KEY_PREFIX + job_id
        return cls(base, *(f"{base}:{name}" for name in cls._fields[1:-1]))


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class NewJob:
    job_id: str
    kind: str
    queue: str
    model: str
    instruction: str
    vector_key: str
    created_at: str = field(default_factory=now_iso)
    notify_url: str | None = None


@dataclass(frozen=True)
class Window:
    """What one window of a streaming enqueue adds to its job."""

    # Its batches, in order: batch id -> the chunks it carries.
    batches: dict[str, int]
    chunks: int
    skipped: int
    episode_keys: list[str]


class JobRecords:
    """Reads and writes job records in Redis and MongoDB."""

    def __init__(self, redis: Redis, db: Database, ttl_seconds: int) -> None:
        self.redis = redis
        self.db = db
        self.ttl = ttl_seconds

    def create(self, job: NewJob) -> JobStatus:
        """Record a job with nothing enqueued yet: in MongoDB first, so a job that MongoDB cannot
        keep never reaches the queue, then in Redis with its producer's key."""
        fields = {
            "kind": job.kind,
            "queue": job.queue,
            "created_at": job.created_at,
            "model": job.model,
            "instruction": job.instruction,
            "vector_key": job.vector_key,
            "episodes": 0,
            "chunks_total": 0,
            "batches_total": 0,
            "embedded": 0,
            "skipped": 0,
            "gpu_seconds": 0.0,
            "cost_usd": 0.0,
            "device": "",
            "enqueue_done": 0,
        }
        if job.notify_url:
            fields["notify_url"] = job.notify_url
        status = JobStatus(job_id=job.job_id, kind=job.kind, state=JobState.QUEUED, created_at=job.created_at,
                           finished_at=None, model=job.model, instruction=job.instruction, episodes=0,
                           chunks=ChunkCounts(), batches=BatchCounts(), gpu_seconds=0.0, cost_usd=0.0, device="",
                           enqueue_done=False, queue=job.queue,
                           notify=NotifyStatus(redact_url(job.notify_url)) if job.notify_url else None)
        self.save(status)
        created = datetime.fromisoformat(job.created_at).timestamp()
        keys = JobKeys.of(job.job_id)
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(keys.record, mapping=fields)
                pipe.set(keys.producer, _producer_name(), ex=PRODUCER_TTL_SECONDS)
                pipe.zadd(JOBS_INDEX, {job.job_id: created})
                # The index lists jobs while Redis holds their records; older ones live on in MongoDB `jobs`.
                pipe.zremrangebyscore(JOBS_INDEX, "-inf", created - self.ttl)
                pipe.execute()
        except RedisError as exc:
            raise QueueError(f"cannot create job {job.job_id} in Redis: {exc}") from exc
        return status

    def add_window(self, job_id: str, window: Window, pipe: Pipeline) -> None:
        """Add the window's counts to `pipe`, the transaction that also enqueues its batches, so
        a window is on the queue and counted whole or not at all."""
        keys = JobKeys.of(job_id)
        pipe.hincrby(keys.record, "chunks_total", window.chunks)
        pipe.hincrby(keys.record, "skipped", window.skipped)
        pipe.hincrby(keys.record, "batches_total", len(window.batches))
        pipe.hincrby(keys.record, "episodes", len(window.episode_keys))
        if window.batches:
            pipe.rpush(keys.batches, *window.batches)
            pipe.hset(keys.sizes, mapping=window.batches)
        if window.episode_keys:
            pipe.sadd(keys.episodes, *window.episode_keys)
        pipe.set(keys.producer, _producer_name(), ex=PRODUCER_TTL_SECONDS)

    def finish_enqueue(self, job_id: str) -> JobStatus:
        """Mark the job wholly enqueued (it may be finished already) and keep its status in MongoDB."""
        keys = JobKeys.of(job_id)
        try:
            scripts.ENQUEUE_DONE.run(self.redis, keys._asdict(), now=now_iso(), ttl=self.ttl)
            self.redis.delete(keys.producer)
        except RedisError as exc:
            raise QueueError(f"cannot mark job {job_id} enqueued in Redis: {exc}") from exc
        status = self.status(job_id)
        self.save(status)
        return status

    def release_producer(self, job_id: str) -> None:
        """Say the job's producer stopped short (best effort: Redis may be what failed)."""
        try:
            self.redis.delete(JobKeys.of(job_id).producer)
        except RedisError as exc:
            logger.warning("job %s: cannot release its producer key: %s", job_id, exc)

    def producer_alive(self, job_id: str) -> bool:
        """Whether the process enqueueing the job may still be at work."""
        return _alive(self.redis.get(JobKeys.of(job_id).producer))

    def has_batch(self, job_id: str, batch_id: str) -> bool:
        """Whether the job exists and enqueued a batch of this id."""
        index = _batch_index(job_id, batch_id)
        if index is None:
            return False
        try:
            total = self.redis.hget(JobKeys.of(job_id).record, "batches_total")
        except RedisError as exc:
            raise QueueError(f"cannot read job {job_id} from Redis: {exc}") from exc
        return total is not None and index < int(total)

    def claim(self, pipe: Pipeline, job_id: str, batch_id: str) -> None:
        """Add to `pipe` the claim of a batch: marked running if its job has it; `claimed` reads the answer.

        The worker sends it in the transaction that registers the batch as started in rq.
        """
        index = _batch_index(job_id, batch_id)
        scripts.CLAIM_BATCH.run(pipe, JobKeys.of(job_id)._asdict(), batch_id=batch_id,
                                index=-1 if index is None else index)

    @staticmethod
    def claimed(job_id: str, batch_id: str, answer: object) -> bool:
        """Whether an earlier run counted the claimed batch already.

        A batch the job does not have is a PayloadError: its payload was not written by podembed,
        or names a job that is over and forgotten.
        """
        if answer not in (0, 1):
            raise PayloadError(f"batch {batch_id}: job {job_id} has no such batch")
        return bool(answer)

    def forget_episodes(self, job_id: str, episode_keys: list[str]) -> None:
        if episode_keys:
            self.redis.srem(JobKeys.of(job_id).episodes, *episode_keys)

    def enqueued_episodes(self, job_id: str) -> set[str]:
        """Keys of the episodes whose chunks the job has wholly enqueued."""
        return {k.decode() for k in self.redis.smembers(JobKeys.of(job_id).episodes)}

    def batch_ids(self, job_id: str) -> list[str]:
        return [b.decode() for b in self.redis.lrange(JobKeys.of(job_id).batches, 0, -1)]

    def open_batches(self, job_id: str) -> list[str]:
        """The job's batches not counted finished, failed or cancelled: queued, running, or gone from rq."""
        keys = JobKeys.of(job_id)
        with self.redis.pipeline() as pipe:
            pipe.lrange(keys.batches, 0, -1)
            pipe.smembers(keys.done)
            pipe.hkeys(keys.failed)
            pipe.hkeys(keys.cancelled)
            listed, *counted = pipe.execute()
        ended = set().union(*counted)
        return [b.decode() for b in listed if b not in ended]

    def batch_chunks(self, job_id: str, batch_ids: list[str]) -> dict[str, int]:
        """How many chunks each of these batches carries (0 for a job enqueued before podembed kept it)."""
        if not batch_ids:
            return {}
        sizes = self.redis.hmget(JobKeys.of(job_id).sizes, batch_ids)
        return {b: int(n or 0) for b, n in zip(batch_ids, sizes, strict=True)}

    def open_jobs(self) -> list[str]:
        """The jobs Redis still holds with batches not counted finished, failed or cancelled."""
        job_ids = [j.decode() for j in self.redis.zrange(JOBS_INDEX, 0, -1)]
        with self.redis.pipeline() as pipe:
            for job_id in job_ids:
                keys = JobKeys.of(job_id)
                pipe.hget(keys.record, "batches_total")
                pipe.scard(keys.done)
                pipe.hlen(keys.failed)
                pipe.hlen(keys.cancelled)
            answers = pipe.execute()
        rows = [answers[i : i + 4] for i in range(0, len(answers), 4)]
        return [job_id for job_id, (total, *counted) in zip(job_ids, rows, strict=True)
                if total is not None and int(total) > sum(counted)]

    def count_finished(
        self, pipe: Pipeline, job_id: str, batch_id: str, *, embedded: int, skipped: int, gpu_seconds: float,
        cost_usd: float, device: str, model: str, tokens: int,
    ) -> None:
        """Add a batch's counts once, to its job and to the totals, in `pipe`, whose result for it is
        ALREADY_COUNTED, COUNTED or JOB_ENDED."""
        scripts.FINISH_BATCH.run(pipe, JobKeys.of(job_id)._asdict(), batch_id=batch_id, embedded=embedded,
                                 skipped=skipped, gpu_seconds=repr(gpu_seconds), cost_usd=repr(cost_usd),
                                 device=device, model=model, tokens=tokens, now=now_iso(), ttl=self.ttl)

    def counted(self, job_id: str, batch_id: str) -> bool:
        """Whether the batch's counts were added already (by this run or an earlier one)."""
        return bool(self.redis.sismember(JobKeys.of(job_id).done, batch_id))

    def mark_stored(self, job_id: str, batch_id: str, n_chunks: int) -> None:
        """Count `n_chunks` of a running batch as embedded (after each forward pass), until the batch is counted."""
        scripts.STORED_SO_FAR.run(self.redis, JobKeys.of(job_id)._asdict(), batch_id=batch_id, stored=n_chunks,
                                  ttl=self.ttl)

    def mark_retrying(self, job_id: str, batch_id: str) -> None:
        self.redis.srem(JobKeys.of(job_id).running, batch_id)

    def mark_failed(self, job_id: str, batch_id: str, n_chunks: int, reason: str) -> None:
        """Count a batch failed for good, with its reason (a batch already counted done stays done)."""
        scripts.FAIL_BATCH.run(self.redis, JobKeys.of(job_id)._asdict(), batch_id=batch_id, n_chunks=n_chunks,
                               reason=reason[:500], now=now_iso(), ttl=self.ttl)

    def status(self, job_id: str) -> JobStatus:
        """The job's status, from Redis while it is there, else from MongoDB."""
        check_job_id(job_id)
        keys = JobKeys.of(job_id)
        try:
            with self.redis.pipeline() as pipe:
                pipe.hgetall(keys.record)
                pipe.scard(keys.done)
                pipe.scard(keys.running)
                pipe.hgetall(keys.failed)
                pipe.hgetall(keys.errors)
                pipe.hgetall(keys.cancelled)
                pipe.hvals(keys.progress)
                pipe.get(keys.producer)
                record, done, running, failed, errors, cancelled, progress, producer = pipe.execute()
        except RedisError as exc:
            raise QueueError(f"cannot read job {job_id} from Redis: {exc}") from exc
        if not record:
            return self.stored_status(job_id)
        rec = {k.decode(): v.decode() for k, v in record.items()}
        failed_chunks = sum(int(n) for n in failed.values())
        chunks = ChunkCounts(
            total=int(rec["chunks_total"]),
            embedded=int(rec["embedded"]),
            skipped=int(rec["skipped"]),
            failed=failed_chunks,
            cancelled=sum(int(n) for n in cancelled.values()),
            in_progress=sum(int(n) for n in progress),
        )
        chunks.pending = chunks.total - chunks.embedded - chunks.skipped - chunks.failed - chunks.cancelled
        batches = BatchCounts(total=int(rec["batches_total"]), running=running, finished=done, failed=len(failed),
                              cancelled=len(cancelled))
        batches.queued = max(0, batches.total - batches.running - batches.finished - batches.failed
                             - batches.cancelled)
        enqueue_done = rec.get("enqueue_done") != "0"
        return JobStatus(
            job_id=job_id,
            kind=rec["kind"],
            state=job_state(batches, cancelled=rec.get("cancelled") == "1", enqueue_done=enqueue_done,
                         producing=_alive(producer)),
            created_at=rec["created_at"],
            finished_at=rec.get("finished_at") or None,
            model=rec["model"],
            instruction=rec["instruction"],
            episodes=int(rec["episodes"]),
            chunks=chunks,
            batches=batches,
            gpu_seconds=float(rec["gpu_seconds"]),
            cost_usd=float(rec["cost_usd"]),
            device=rec["device"],
            errors={k.decode(): v.decode() for k, v in errors.items()},
            enqueue_done=enqueue_done,
            queue=rec.get("queue"),
            notify=notify_status(rec),
        )

    def save(self, status: JobStatus) -> None:
        """Keep the status in MongoDB `jobs`, which outlives the Redis record."""
        try:
            # `_id` in the document too: nx-27017 does not take it from the filter on upsert.
            self.db.jobs.replace_one({"_id": status.job_id}, {"_id": status.job_id, **status.to_dict()}, upsert=True)
        except PyMongoError as exc:
            raise StoreError(f"cannot save job {status.job_id} to MongoDB: {exc}") from exc

    def ended_status(self, job_id: str, down: QueueError) -> tuple[JobStatus, str]:
        """With Redis away (`down`), the status MongoDB `jobs` kept if the job had ended (its counts no longer
        change), and a note saying so; `down` again, naming the job's state, if it had not."""
        try:
            status = self.stored_status(job_id)
        except JobNotFoundError:
            raise down from None
        if not status.ended:
            raise QueueError(f"{down}; job {job_id} was {status.state} when last saved, and its live counters are "
                             "in Redis") from None
        return status, f"{down}: live counters unavailable; job {job_id} as MongoDB `jobs` kept it when it ended"

    def stored_status(self, job_id: str) -> JobStatus:
        """The status as last saved in MongoDB `jobs` (what `status` shows once Redis forgot the job)."""
        check_job_id(job_id)
        try:
            doc = self.db.jobs.find_one({"_id": job_id})
        except PyMongoError as exc:
            raise StoreError(f"cannot read job {job_id} from MongoDB: {exc}") from exc
        if doc is None:
            raise JobNotFoundError(f"no job with id {job_id!r}")
        doc.pop("_id", None)
        doc["state"] = JobState(doc["state"])
        doc["chunks"] = ChunkCounts(**doc["chunks"])
        doc["batches"] = BatchCounts(**doc["batches"])
        if doc.get("notify"):
            doc["notify"] = NotifyStatus(**doc["notify"])
        return JobStatus(**doc)

    def cancelled(self, job_id: str) -> bool:
        try:
            return self.redis.hget(JobKeys.of(job_id).record, "cancelled") == b"1"
        except RedisError as exc:
            raise QueueError(f"cannot read job {job_id} from Redis: {exc}") from exc

    def mark_cancelled(self, job_id: str) -> None:
        """Flag the job cancelled (its state from now on) and stamp when; a no-op once Redis forgot it."""
        record = JobKeys.of(job_id).record
        try:
            if self.redis.exists(record):
                with self.redis.pipeline() as pipe:
                    pipe.hset(record, "cancelled", "1")
                    pipe.hsetnx(record, "finished_at", now_iso())
                    pipe.execute()
        except RedisError as exc:
            raise QueueError(f"cannot mark job {job_id} cancelled in Redis: {exc}") from exc

    def count_cancelled(self, job_id: str, removed: dict[str, int]) -> None:
        """Count these batches (batch id -> chunks) cancelled: taken off the queue before they ran."""
        if not removed:
            return
        key = JobKeys.of(job_id).cancelled
        try:
            with self.redis.pipeline() as pipe:
                pipe.hset(key, mapping=removed)
                pipe.expire(key, self.ttl)
                pipe.execute()
        except RedisError as exc:
            raise QueueError(f"cannot count cancelled batches of job {job_id} in Redis: {exc}") from exc

    def clear_failed(self, job_id: str, batch_ids: list[str]) -> None:
        """Count these failed batches as queued again (they are being retried): the job is not over, and
        its end will be notified again."""
        if not batch_ids:
            return
        keys = JobKeys.of(job_id)
        try:
            with self.redis.pipeline() as pipe:
                pipe.hdel(keys.failed, *batch_ids)
                pipe.hdel(keys.errors, *batch_ids)
                pipe.hdel(keys.record, "finished_at", *NOTIFY_DELIVERY_FIELDS)
                pipe.execute()
        except RedisError as exc:
            raise QueueError(f"cannot clear failed batches of job {job_id} in Redis: {exc}") from exc

    def recent(self, limit: int) -> list[JobStatus]:
        """The newest jobs first, as far as Redis's index or MongoDB still know them."""
        try:
            job_ids = [j.decode() for j in self.redis.zrevrange(JOBS_INDEX, 0, limit - 1)]
        except RedisError as exc:
            raise QueueError(f"cannot read the job index from Redis: {exc}") from exc
        statuses = []
        for job_id in job_ids:
            try:
                statuses.append(self.status(job_id))
            except JobNotFoundError:
                continue
        return statuses


def check_job_id(job_id: str) -> None:
    """A JobNotFoundError for what is no job id: `{id}:done` would name another of the job's keys."""
    if not JOB_ID.fullmatch(job_id):
        raise JobNotFoundError(f"no job with id {job_id[:40]!r}: a job id is 12 hex digits")


def _batch_index(job_id: str, batch_id: str) -> int | None:
    """The batch's index in its job, if its id is one of the job's batch ids."""
    match = BATCH_ID.fullmatch(batch_id)
    return int(match["index"]) if match is not None and match["job"] == job_id else None


def _producer_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(producer: bytes | None) -> bool:
    """Whether the producer named by a job's producer key (`_producer_name`) may still be at work: on this
    machine its process tells at once (a Ctrl-C, a SIGKILL); on another, only the key's expiry does."""
    if producer is None:
        return False
    host, _, pid = producer.decode().rpartition(":")
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    return True
