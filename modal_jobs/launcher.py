"""How many drains the backlog needs, from the throughput the ledger measured; and spawning them.

One drain is one GPU container working for up to `drain_budget_s`. The plan is plain
arithmetic on the queue and the ledger; `launch` takes the spawn function as an
argument (the deployed class on Modal, a fake in tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

from pymongo.database import Database
from pymongo.errors import PyMongoError
from redis import Redis
from redis.exceptions import RedisError
from rq import Worker
from rq.job import Job
from rq.serializers import JSONSerializer

from config.errors import PodembedError, QueueError, StoreError
from config.settings import Settings
from modal_jobs.settings import ModalSettings
from producer.enqueue import batch_queue
from producer.operations import THROUGHPUT_WINDOW, nightly
from producer.sources import MONGO, open_source

T = TypeVar("T")


@dataclass(frozen=True)
class Backlog:
    """Batches waiting on the queue, with the chunks and tokens the producer recorded in their meta."""

    batches: int
    chunks: int
    tokens: int


@dataclass(frozen=True)
class Throughput:
    tokens_per_s: float
    measured_batches: int  # ledger entries it comes from; 0: PODEMBED_DEFAULT_TOKENS_PER_SECOND, a guess


@dataclass(frozen=True)
class LaunchPlan:
    backlog: Backlog
    throughput: Throughput
    drain_budget_s: int
    max_containers: int
    running: int  # workers already draining the queue
    drains: int  # drains to spawn now

    def to_dict(self) -> dict:
        return asdict(self)


def read_backlog(settings: Settings, redis: Redis) -> Backlog:
    """Queued batches; a batch without `n_tokens` in its meta counts as a full one."""
    queue = batch_queue(settings, redis)
    try:
        job_ids = queue.get_job_ids()
        with redis.pipeline() as pipe:
            for job_id in job_ids:
                pipe.hget(Job.key_for(job_id), "meta")
            metas = pipe.execute()
    except RedisError as exc:
        raise QueueError(f"cannot read queue {queue.name!r}: {exc}") from exc
    chunks = tokens = 0
    for raw in metas:
        meta = JSONSerializer.loads(raw) if raw else {}
        chunks += int(meta.get("n_chunks", settings.batch_max_chunks))
        tokens += int(meta.get("n_tokens", settings.batch_max_tokens))
    return Backlog(batches=len(job_ids), chunks=chunks, tokens=tokens)


def running_workers(settings: Settings, redis: Redis) -> int:
    try:
        return Worker.count(connection=redis, queue=batch_queue(settings, redis))
    except RedisError as exc:
        raise QueueError(f"cannot count workers on {settings.queue_name!r}: {exc}") from exc


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
    on_gpu = [d for d in docs if gpu.lower() in str(d.get("device", "")).lower()]
    seconds = sum(d["wall_seconds"] for d in on_gpu)
    if seconds <= 0:
        return None
    return Throughput(tokens_per_s=sum(d["n_tokens"] for d in on_gpu) / seconds, measured_batches=len(on_gpu))


def drains_needed(
    backlog: Backlog, *, tokens_per_s: float, drain_budget_s: float, max_containers: int, running: int = 0
) -> int:
    """Drains to spawn: enough to clear the backlog in one budget, at least one while anything
    waits, never more batches than there are nor more containers than allowed, less those running."""
    if backlog.batches == 0:
        return 0
    needed = math.ceil(backlog.tokens / (tokens_per_s * drain_budget_s))
    needed = min(max(needed, 1), backlog.batches, max_containers)
    return max(0, needed - running)


def plan_launch(settings: Settings, modal_settings: ModalSettings, redis: Redis, db: Database) -> LaunchPlan:
    backlog = read_backlog(settings, redis)
    throughput = measured_throughput(db, model=settings.model, gpu=modal_settings.gpu) \
        or Throughput(tokens_per_s=settings.default_tokens_per_second, measured_batches=0)
    running = running_workers(settings, redis)
    drains = drains_needed(backlog, tokens_per_s=throughput.tokens_per_s, drain_budget_s=modal_settings.drain_budget_s,
                           max_containers=modal_settings.max_containers, running=running)
    return LaunchPlan(backlog=backlog, throughput=throughput, drain_budget_s=modal_settings.drain_budget_s,
                      max_containers=modal_settings.max_containers, running=running, drains=drains)


def launch(plan: LaunchPlan, spawn: Callable[[float], T]) -> list[T]:
    """Spawn `plan.drains` drains, each with the plan's time budget."""
    return [spawn(plan.drain_budget_s) for _ in range(plan.drains)]


def run_launcher(
    settings: Settings, modal_settings: ModalSettings, redis: Redis, db: Database, spawn: Callable[[float], str]
) -> dict:
    """Plan and spawn; what the Modal `launcher` function returns."""
    plan = plan_launch(settings, modal_settings, redis, db)
    return {"plan": plan.to_dict(), "calls": launch(plan, spawn)}


def run_nightly(
    settings: Settings, modal_settings: ModalSettings, redis: Redis, db: Database, spawn: Callable[[float], str]
) -> dict:
    """The cron: new or changed transcripts of MongoDB `transcripts` as one job, then the drains it needs."""
    run = nightly(settings, redis, db, open_source(MONGO, db))
    return {"nightly": run.to_dict(), **run_launcher(settings, modal_settings, redis, db, spawn)}


def remote_spawner(modal_settings: ModalSettings, class_name: str = "GpuWorker") -> Callable[[float], str]:
    """Spawns drains on the deployed app; returns each call's id. Needs Modal credentials."""
    import modal
    from modal.exception import Error as ModalError

    drain = modal.Cls.from_name(modal_settings.app_name, class_name)().drain

    def spawn(time_budget_s: float) -> str:
        try:
            return drain.spawn(time_budget_s).object_id
        except ModalError as exc:
            raise PodembedError(
                f"cannot spawn a drain on the Modal app {modal_settings.app_name!r} ({type(exc).__name__}: {exc}); "
                "is it deployed (`modal deploy modal_jobs/app.py`) and are Modal credentials set?"
            ) from exc

    return spawn
