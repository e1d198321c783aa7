"""The fleet at a glance, read from Redis and MongoDB: queues, jobs by state, totals, workers, the ledger's recent past.

`/metrics` and the dashboard both read it here, at request time: a Modal container's counters would die with
it, so nothing is kept in a process. Every read is bounded by what is live or recent, never by what is
stored: Redis lengths and sorted-set sizes, a queue's head, the running totals `count_finished` keeps,
indexed counts and ranges in MongoDB (`ensure_indexes`). The vectors are never read.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pymongo.database import Database
from pymongo.errors import PyMongoError
from redis import Redis
from redis.exceptions import RedisError

from config.errors import QueueError, StoreError
from config.settings import Settings
from producer.batches.registries import count_batches, registered_workers
from producer.enqueue import batch_queues
from producer.job_status import JobState
from producer.jobs import TOTALS, TOTALS_KEY, JobRecords

logger = logging.getLogger(__name__)

# The most ledger entries one read takes: a histogram window or a chart holding more covers the latest only.
MAX_LEDGER_READ = 20_000
FIRST_LEDGER_READ = 32  # then 4x as many, until the window is covered
# A container that missed this many heartbeats and recorded no exit is lost (as `podembed costs` counts it).
LOST_AFTER_BEATS = 3


@dataclass
class QueueState:
    queue: str
    # Batches by state: `queued` on the queue, the others in rq's registries of it.
    batches: dict[str, int]
    # Since the batch at the queue's head was enqueued (None: the queue is empty).
    oldest_age_seconds: float | None


@dataclass
class Total:
    """What the batches counted on one device under one model added up to (`podembed:totals`)."""

    device: str
    model: str
    values: dict[str, float]


@dataclass
class WorkerState:
    name: str
    device: str  # from the container's `workers` record; "unknown" for a local worker, which keeps none
    state: str  # rq's: busy, idle, ...; "lost" for a container that stopped beating without an exit
    last_heartbeat: str | None
    current_batch: str | None = None
    busy_seconds: float | None = None
    billed_seconds: float | None = None


@dataclass
class Workers:
    live: list[WorkerState] = field(default_factory=list)
    lost: int = 0  # containers ever lost without an exit


def ensure_indexes(db: Database) -> None:
    """The indexes the reads below range over (created once; a failure only makes reads slower)."""
    try:
        db.batches.create_index("finished_at")
        db.jobs.create_index("state")
        db.workers.create_index("updated_at")
    except PyMongoError as exc:
        logger.warning("cannot create the indexes the fleet's reads use (they will scan): %s", exc)


def read_queues(settings: Settings, redis: Redis, now: datetime) -> list[QueueState]:
    """Each batch queue's depth, its registries' sizes, and how long its head has waited: two round trips."""
    queues = batch_queues(settings, redis)
    try:
        counts = count_batches(redis, queues)
    except RedisError as exc:
        raise QueueError(f"cannot read the queues from Redis: {exc}") from exc
    states = []
    for queue, count in zip(queues, counts, strict=True):
        age = None
        if count.head_enqueued_at:
            at = datetime.fromisoformat(count.head_enqueued_at.replace("Z", "+00:00"))
            age = max(0.0, (now - at).total_seconds())
        states.append(QueueState(queue=queue.name, batches=count.batches, oldest_age_seconds=age))
    return states


def read_totals(redis: Redis) -> list[Total]:
    """The running totals of every batch ever counted, by device and model."""
    try:
        raw = redis.hgetall(TOTALS_KEY)
    except RedisError as exc:
        raise QueueError(f"cannot read the totals from Redis: {exc}") from exc
    totals: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: dict.fromkeys(TOTALS, 0.0))
    for key, value in raw.items():
        name, device, model = key.decode().split("\t", 2)
        totals[(device, model)][name] = float(value)
    return [Total(device=d, model=m, values=v) for (d, m), v in sorted(totals.items())]


def count_jobs(records: JobRecords) -> dict[str, int]:
    """Jobs by state: ended ones counted in MongoDB `jobs` (indexed), the others read live from Redis."""
    try:
        # One round trip for the ended states (nx-27017 answers each count_documents as a pipeline of its own).
        ended = records.db.jobs.aggregate([{"$match": {"state": {"$in": sorted(JobState.ENDED)}}},
                                           {"$group": {"_id": "$state", "n": {"$sum": 1}}}])
        counts = {d["_id"]: d["n"] for d in ended}
        undone = [d["_id"] for d in records.db.jobs.find({"state": {"$nin": sorted(JobState.ENDED)}}, {"_id": 1})]
    except PyMongoError as exc:
        raise StoreError(f"cannot count jobs in MongoDB: {exc}") from exc
    for job_id in undone:
        # MongoDB's copy of a running job lags (and an interrupted one is never copied): Redis tells.
        state = records.status(job_id).state
        counts[state] = counts.get(state, 0) + 1
    return counts


def read_workers(settings: Settings, redis: Redis, db: Database, now: datetime) -> Workers:
    """Workers registered with rq (local and Modal alike), with their container's record where there is one."""
    cutoff = now - timedelta(seconds=LOST_AFTER_BEATS * settings.heartbeat_interval)
    try:
        registered = registered_workers(redis)
    except RedisError as exc:
        raise QueueError(f"cannot read the workers from Redis: {exc}") from exc
    try:
        # Containers that beat recently, and a count of those that stopped without an exit.
        recent = {d["_id"]: d for d in db.workers.find({"updated_at": {"$gte": cutoff}, "exited_at": None})}
        # Counted here: nx-27017's count_documents matches no document on `"exited_at": None`.
        lost = len(list(db.workers.find({"updated_at": {"$lt": cutoff}, "exited_at": None}, {"_id": 1})))
    except PyMongoError as exc:
        raise StoreError(f"cannot read {db.name}.workers: {exc}") from exc
    live = []
    for worker in registered:
        record = recent.pop(worker.name, None)
        live.append(_worker(worker.name, record, state=worker.state or "?", beat=worker.last_heartbeat,
                            current=worker.current_batch))
    # A container between drains is not registered with rq, but still billed.
    live += [_worker(name, record, state="between drains", beat=record["updated_at"].isoformat(), current=None)
             for name, record in sorted(recent.items())]
    return Workers(live=live, lost=lost)


def recent_batches(db: Database, since: datetime, fields: tuple[str, ...]) -> list[dict]:
    """Ledger entries that finished since `since`, newest first, at most MAX_LEDGER_READ of them.

    The newest entries by the index on `finished_at`, more each time until one is older than `since`: a
    range filter instead makes nx-27017 look at every entry (20x slower over 10,000), and it sends all
    a query's entries at once, however few are read.
    """
    projection = dict.fromkeys((*fields, "finished_at"), 1)
    limit = FIRST_LEDGER_READ
    try:
        while True:
            latest = list(db.batches.find({}, projection).sort("finished_at", -1).limit(limit))
            inside = [e for e in latest if _aware(e["finished_at"]) >= since]
            if len(inside) < limit or limit >= MAX_LEDGER_READ:
                return inside
            limit = min(4 * limit, MAX_LEDGER_READ)
    except PyMongoError as exc:
        raise StoreError(f"cannot read the ledger {db.name}.batches: {exc}") from exc


def ledger_series(db: Database, now: datetime, *, hours: int = 24, step_seconds: int = 900) -> list[dict]:
    """Chunks per second and USD per hour of compute, per `step_seconds`, over the last `hours`, oldest first."""
    start = now - timedelta(hours=hours)
    steps = hours * 3600 // step_seconds
    chunks, cost = [0] * steps, [0.0] * steps
    for entry in recent_batches(db, start, ("n_chunks", "cost_usd")):
        i = min(steps - 1, int((_aware(entry["finished_at"]) - start).total_seconds() // step_seconds))
        chunks[i] += entry.get("n_chunks", 0)
        cost[i] += entry.get("cost_usd", 0.0)
    return [{"t": (start + timedelta(seconds=(i + 1) * step_seconds)).isoformat(timespec="seconds"),
             "chunks_per_second": chunks[i] / step_seconds, "usd_per_hour": cost[i] * 3600 / step_seconds}
            for i in range(steps)]


def _worker(name: str, record: dict | None, *, state: str, beat: str | None, current: str | None) -> WorkerState:
    if record is None:
        return WorkerState(name=name, device="unknown", state=state, last_heartbeat=beat, current_batch=current)
    return WorkerState(name=name, device=record["device"], state=state, last_heartbeat=beat, current_batch=current,
                       busy_seconds=record["busy_seconds"], billed_seconds=record["billed_seconds"])


def _aware(at: datetime) -> datetime:
    # A client without tz_aware hands back naive datetimes; the ledger's are UTC.
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at
