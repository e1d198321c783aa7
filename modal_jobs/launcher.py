"""How many drains the backlog needs, from the throughput the ledger measured; and spawning them.

One drain is one GPU container working for up to `drain_budget_s`. The plan is plain
arithmetic on the queues (every kind's: drains take them in priority order) and the ledger;
`launch` takes the spawn function as an argument (the deployed class on Modal, a fake in tests).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

from pymongo.database import Database
from pymongo.errors import PyMongoError
from redis import Redis
from redis.exceptions import RedisError

from config.devices import is_gpu
from config.errors import PodembedError, QueueError, StoreError
from config.settings import Settings
from modal_jobs.settings import ModalSettings, drain_budget
from modal_jobs.spawns import SpawnLedger
from producer.batches.registries import batch_metas, waiting_batches, worker_keys
from producer.enqueue import batch_queue
from producer.operations import THROUGHPUT_WINDOW, nightly
from producer.sources import MONGO, open_source

T = TypeVar("T")


@dataclass(frozen=True)
class Backlog:
    """Batches a drain can take now, with the chunks and tokens the producer recorded in their meta.

    They are the queued batches, the retries whose back-off has passed (a drain's scheduler moves
    them onto the queue) and the abandoned ones (started, their worker's heartbeat lapsed: any
    worker's maintenance pass hands them back to RQ's retry). Retries due later are counted apart:
    the next launcher run after they fall due spawns for them.
    """

    batches: int
    chunks: int
    tokens: int
    queued: int = 0
    retries_due: int = 0
    abandoned: int = 0
    retries_later: int = 0
    next_retry_in_s: float | None = None  # seconds until the earliest retry due later

    def __add__(self, other: Backlog) -> Backlog:
        later = [s for s in (self.next_retry_in_s, other.next_retry_in_s) if s is not None]
        return Backlog(batches=self.batches + other.batches, chunks=self.chunks + other.chunks,
                       tokens=self.tokens + other.tokens, queued=self.queued + other.queued,
                       retries_due=self.retries_due + other.retries_due, abandoned=self.abandoned + other.abandoned,
                       retries_later=self.retries_later + other.retries_later,
                       next_retry_in_s=min(later, default=None))


@dataclass(frozen=True)
class Throughput:
    tokens_per_s: float
    measured_batches: int  # ledger entries it comes from; 0: PODEMBED_DEFAULT_TOKENS_PER_SECOND, a guess
    largest_batch_s: float = 0.0  # the longest of those batches, wall seconds


@dataclass(frozen=True)
class LaunchPlan:
    backlog: Backlog  # every queue's
    queues: dict[str, Backlog]  # each queue's, highest priority first
    # The highest-priority queue with a backlog, and the seconds its backlog needs to clear with the
    # drains running, cold and spawned now (cold starts not counted; with a backfill share, the share
    # the backfill takes meanwhile counted). None when nothing waits.
    first_queue: str | None
    first_clear_s: float | None
    throughput: Throughput
    drain_budget_s: float  # clamped under the deployed timeout
    max_containers: int
    running: int  # workers already draining the queue
    cold: int  # drains spawned earlier that have not started yet
    drains: int  # drains to spawn now

    def to_dict(self) -> dict:
        return asdict(self)


def read_backlog(settings: Settings, redis: Redis, now: float | None = None) -> Backlog:
    """The backlog of every queue at `now` (default: the time of the call)."""
    return sum(read_backlogs(settings, redis, now).values(), Backlog(batches=0, chunks=0, tokens=0))


def read_backlogs(settings: Settings, redis: Redis, now: float | None = None) -> dict[str, Backlog]:
    """Each queue's backlog at `now` (default: the time of the call), highest priority first."""
    now = time.time() if now is None else now
    return {name: queue_backlog(settings, redis, name, now) for name in settings.queue_names()}


def queue_backlog(settings: Settings, redis: Redis, name: str, now: float) -> Backlog:
    """One queue's backlog at `now`; a batch without `n_tokens` in its meta counts as a full one."""
    queue = batch_queue(settings, redis, name=name)
    try:
        waiting = waiting_batches(queue, now)
        batch_ids = [*waiting.queued, *waiting.due, *waiting.abandoned]
        metas = batch_metas(redis, batch_ids)
    except RedisError as exc:
        raise QueueError(f"cannot read queue {queue.name!r}: {exc}") from exc
    chunks = sum(int(meta.get("n_chunks", settings.batch_max_chunks)) for meta in metas)
    tokens = sum(int(meta.get("n_tokens", settings.batch_max_tokens)) for meta in metas)
    later = waiting.later
    return Backlog(batches=len(batch_ids), chunks=chunks, tokens=tokens, queued=len(waiting.queued),
                   retries_due=len(waiting.due), abandoned=len(waiting.abandoned), retries_later=len(later),
                   next_retry_in_s=round(min(later) - now, 3) if later else None)


def running_workers(settings: Settings, redis: Redis) -> int:
    """Workers on any of the queues (each drain listens on all of them), counted once."""
    names = settings.queue_names()
    try:
        return len(worker_keys([batch_queue(settings, redis, name=name) for name in names]))
    except RedisError as exc:
        raise QueueError(f"cannot count workers on {', '.join(names)}: {exc}") from exc


def measured_throughput(db: Database, *, model: str, gpu: str) -> Throughput | None:
    """Tokens per second of drain time on this GPU type, from the most recent ledger entries.

    Wall seconds, not compute seconds: a drain's budget is spent on storing and queue
    round trips too. None when the ledger has no batch of this model on this GPU.
    """
    try:
        docs = list(db.batches.find({"model": model}, {"n_tokens": 1, "wall_seconds": 1, "device": 1})
                    .sort("finished_at", -1).limit(THROUGHPUT_WINDOW))
    except PyMongoError as exc:
        raise StoreError(f"cannot read the ledger {db.name}.batches: {exc}") from exc
    # By whole words: an "A10G" deployment may run on hosts that torch calls "NVIDIA A10" (config/devices.py).
    on_gpu = [d for d in docs if is_gpu(gpu, str(d.get("device", "")))]
    seconds = sum(d["wall_seconds"] for d in on_gpu)
    if seconds <= 0:
        return None
    return Throughput(tokens_per_s=sum(d["n_tokens"] for d in on_gpu) / seconds, measured_batches=len(on_gpu),
                      largest_batch_s=max(d["wall_seconds"] for d in on_gpu))


def drains_needed(
    backlog: Backlog, *, tokens_per_s: float, work_s: float, max_containers: int, running: int = 0
) -> int:
    """Drains to spawn: one for each `work_s` of the backlog's work, so that it clears in about the least
    time the containers allow while each drain still gets that much work for its cold start; at least
    one while anything waits, never more batches than there are nor more containers than allowed, less
    those running."""
    if backlog.batches == 0:
        return 0
    needed = math.ceil(backlog.tokens / (tokens_per_s * work_s))
    needed = min(max(needed, 1), backlog.batches, max_containers)
    return max(0, needed - running)


def first_clear_seconds(settings: Settings, queues: dict[str, Backlog], *, tokens_per_s: float,
                        containers: int) -> tuple[str | None, float | None]:
    """The highest-priority queue with a backlog, and the seconds `containers` drains need to clear it.

    Drains take it before any lower queue, except the backfill share while the backfill waits too.
    """
    waiting = [(name, b) for name, b in queues.items() if b.batches]
    if not waiting:
        return None, None
    name, first = waiting[0]
    if containers <= 0:
        return name, None
    backfill = settings.queue_names()[-1]
    rate = tokens_per_s * min(containers, first.batches)
    if settings.backfill_share and name != backfill and queues[backfill].batches:
        rate *= 1 - settings.backfill_share
    return name, round(first.tokens / rate, 1)


def plan_launch(
    settings: Settings, modal_settings: ModalSettings, redis: Redis, db: Database, now: float | None = None
) -> LaunchPlan:
    queues = read_backlogs(settings, redis, now)
    backlog = sum(queues.values(), Backlog(batches=0, chunks=0, tokens=0))
    throughput = measured_throughput(db, model=settings.model, gpu=modal_settings.gpu) \
        or Throughput(tokens_per_s=settings.default_tokens_per_second, measured_batches=0)
    budget = drain_budget(modal_settings, modal_settings.drain_budget_s, job_timeout=settings.job_timeout,
                          largest_batch_s=throughput.largest_batch_s)
    running = running_workers(settings, redis)
    cold = SpawnLedger(redis, settings.queue_name).cold(modal_settings.cold_start_grace_s, now)
    # A launcher period of work a drain: sized for one budget instead, a backlog under max_containers budgets
    # got fewer drains than allowed, and took up to max_containers times its least time.
    drains = drains_needed(backlog, tokens_per_s=throughput.tokens_per_s,
                           work_s=min(modal_settings.launcher_period_s, budget),
                           max_containers=modal_settings.max_containers, running=running + cold)
    first_queue, first_clear_s = first_clear_seconds(settings, queues, tokens_per_s=throughput.tokens_per_s,
                                                     containers=running + cold + drains)
    return LaunchPlan(backlog=backlog, queues=queues, first_queue=first_queue, first_clear_s=first_clear_s,
                      throughput=throughput, drain_budget_s=budget, max_containers=modal_settings.max_containers,
                      running=running, cold=cold, drains=drains)


def launch(plan: LaunchPlan, spawn: Callable[[float, str], T], spawns: SpawnLedger) -> list[T]:
    """Spawn `plan.drains` drains, each with the plan's time budget and a spawn id noted as cold."""
    calls = []
    for _ in range(plan.drains):
        spawn_id = spawns.add()
        try:
            calls.append(spawn(plan.drain_budget_s, spawn_id))
        except BaseException:
            spawns.started(spawn_id)  # never spawned: not a cold drain either
            raise
    return calls


def run_launcher(
    settings: Settings, modal_settings: ModalSettings, redis: Redis, db: Database,
    spawn: Callable[[float, str], str],
) -> dict:
    """Plan and spawn; what the Modal `launcher` function returns (it runs every few minutes, so
    retries that fall due and abandoned batches are picked up after a drain has ended)."""
    plan = plan_launch(settings, modal_settings, redis, db)
    return {"plan": plan.to_dict(), "calls": launch(plan, spawn, SpawnLedger(redis, settings.queue_name))}


def run_nightly(
    settings: Settings, modal_settings: ModalSettings, redis: Redis, db: Database,
    spawn: Callable[[float, str], str],
) -> dict:
    """The cron: new or changed transcripts of MongoDB `transcripts` as one job, then the drains it needs."""
    run = nightly(settings, redis, db, open_source(MONGO, db))
    return {"nightly": run.to_dict(), **run_launcher(settings, modal_settings, redis, db, spawn)}


def remote_spawner(modal_settings: ModalSettings, class_name: str = "GpuWorker") -> Callable[[float, str], str]:
    """Spawns drains on the deployed app; returns each call's id. Needs Modal credentials."""
    import modal
    from modal.exception import Error as ModalError

    drain = modal.Cls.from_name(modal_settings.app_name, class_name)().drain

    def spawn(time_budget_s: float, spawn_id: str) -> str:
        try:
            return drain.spawn(time_budget_s, spawn_id).object_id
        except ModalError as exc:
            raise PodembedError(
                f"cannot spawn a drain on the Modal app {modal_settings.app_name!r} ({type(exc).__name__}: {exc}); "
                "is it deployed (`modal deploy modal_jobs/app.py`) and are Modal credentials set?"
            ) from exc

    return spawn
