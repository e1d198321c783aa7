"""The backlog a launcher sees: retries waiting out real back-offs, abandoned batches, drains still cold-starting.

Redis, MongoDB, RQ and the worker are real; only Modal's `spawn` is replaced, by a function that
runs the drain here, in this process, as the container would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pymongo.database import Database
from redis import Redis
from rq import Queue
from rq.executions import Execution
from rq.serializers import JSONSerializer

from config.errors import ConfigError
from config.services import local_services, services_up
from config.settings import Settings
from modal_jobs.drain import Container
from modal_jobs.launcher import plan_launch, read_backlog, run_launcher
from modal_jobs.settings import ModalSettings, drain_budget
from modal_jobs.spawns import SpawnLedger
from producer.enqueue import EnqueuedJob, batch_queue, ingest, parse_files
from producer.jobs import JobRecords
from tests.conftest import DATA, ROOT
from tests.soak.harness import wait_until
from worker.loop import drain, make_worker

BACK_OFF = 3  # seconds: a real back-off, which a burst drain outlives


def _ingest(settings: Settings, redis: Redis, db: Database, path: Path) -> EnqueuedJob:
    episodes, refused = parse_files([path], podcast="The Seen and the Unseen")
    assert refused == []
    return ingest(settings, redis, db, episodes, kind="ingest")


def test_retry_after_the_drain_ended_is_counted_and_launched_for_when_due(
    settings: Settings, redis: Redis, db: Database
) -> None:
    settings = settings.replace(retry_intervals=(BACK_OFF,), mongo_timeout_ms=500)
    job = _ingest(settings, redis, db, DATA / "E03.srt")
    assert job.batches == 1
    worker, _ = make_worker(settings, redis)
    # MongoDB goes away: the batch fails, and RQ schedules its retry BACK_OFF s later.
    local_services(settings)[1].stop()
    try:
        failed_at = time.time()
        # A budget that ends before the back-off does: a drain keeps going only for retries due within it.
        tally = drain(worker, time_budget_s=BACK_OFF - 1)
    finally:
        services_up(settings)
    assert (tally.batches, tally.failed) == (1, 1)
    assert batch_queue(settings, redis).count == 0

    # The queue is empty, yet the batch is not lost to the launcher: it is counted, as due later.
    backlog = read_backlog(settings, redis)
    assert (backlog.batches, backlog.queued, backlog.retries_due, backlog.retries_later) == (0, 0, 0, 1)
    assert 0 < backlog.next_retry_in_s <= BACK_OFF
    plan = plan_launch(settings, ModalSettings(), redis, db)
    assert plan.drains == 0
    shown = _cli(settings, "launch", "--dry-run")
    assert shown.returncode == 0, shown.stderr
    assert "backlog: 0 batches (0 queued, 0 retries due, 0 abandoned)" in shown.stdout
    assert "1 retries wait out their back-off (the first in " in shown.stdout
    # Once the back-off has passed, the same backlog plans a drain for it.
    due = plan_launch(settings, ModalSettings(), redis, db, now=failed_at + BACK_OFF + 1)
    assert (due.backlog.batches, due.backlog.retries_due, due.backlog.tokens, due.drains) == (1, 1, job.tokens, 1)

    # The deployed launcher runs every few minutes; here it runs once the retry is due, for real.
    wait_until(lambda: read_backlog(settings, redis).retries_due == 1, timeout=BACK_OFF + 5, what="retry due")
    container = Container(settings, gpu="cpu")
    container.load_weights("ta-retry")
    container.start("ta-retry")
    summaries = []

    def spawn(budget: float, spawn_id: str) -> str:
        assert SpawnLedger(redis, settings.queue_name).cold(900) == 1  # noted before the call
        summaries.append(container.drain(budget, spawn_id))
        return f"fc-{len(summaries)}"

    launched = run_launcher(settings, ModalSettings(), redis, db, spawn)
    container.stop()
    assert launched["calls"] == ["fc-1"]
    assert (summaries[0].batches, summaries[0].failed, summaries[0].retries_later) == (1, 0, 0)
    assert JobRecords(redis, db, settings.result_ttl).status(job.job_id).state == "finished"
    assert SpawnLedger(redis, settings.queue_name).cold(900) == 0  # the drain cleared its note


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PODEMBED_REDIS_URL": settings.redis_url,
           "PODEMBED_MONGO_URI": settings.mongo_uri, "PODEMBED_MONGO_DB": settings.mongo_db}
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_abandoned_batch_counts_once_its_heartbeat_lapses(settings: Settings, redis: Redis, db: Database) -> None:
    settings = settings.replace(batch_max_chunks=16)
    job = _ingest(settings, redis, db, DATA / "E03.srt")
    queue = batch_queue(settings, redis)
    # What a worker does when it takes a batch: dequeue it and register its execution, here with a
    # heartbeat of 1 s. This worker then dies: nothing beats again.
    taken, _ = Queue.dequeue_any([queue], None, connection=redis, serializer=JSONSerializer)
    now = time.time()
    with redis.pipeline() as pipe:
        Execution.create(taken, ttl=1, pipeline=pipe, worker_name="lost")
        pipe.execute()

    running = read_backlog(settings, redis, now)
    assert (running.batches, running.queued, running.abandoned) == (job.batches - 1, job.batches - 1, 0)
    lapsed = read_backlog(settings, redis, now + 2)
    assert (lapsed.batches, lapsed.queued, lapsed.abandoned) == (job.batches, job.batches - 1, 1)
    assert lapsed.tokens == job.tokens
    assert plan_launch(settings, ModalSettings(), redis, db, now=now + 2).drains == 1
    # `podembed launch --dry-run`, once the heartbeat has really lapsed, counts it too.
    wait_until(lambda: read_backlog(settings, redis).abandoned == 1, timeout=10, what="heartbeat lapsed")
    shown = _cli(settings, "launch", "--dry-run", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["backlog"]["abandoned"] == 1


def test_cold_drains_count_until_they_start_or_their_grace_ends(
    settings: Settings, redis: Redis, db: Database
) -> None:
    settings = settings.replace(batch_max_chunks=2, default_tokens_per_second=1.0)
    job = _ingest(settings, redis, db, DATA / "E03.srt")
    modal = ModalSettings(drain_budget_s=1000, launcher_period_s=1000, cold_start_grace_s=600)
    first = run_launcher(settings, modal, redis, db, lambda budget, spawn_id: spawn_id)
    # 2533 tokens at 1 token/s, 1000 s of work a drain.
    assert len(first["calls"]) == first["plan"]["drains"] == -(-job.tokens // 1000) == 3
    # A second launch before any container has started spawns nothing more.
    again = run_launcher(settings, modal, redis, db, lambda budget, spawn_id: spawn_id)
    assert (again["plan"]["cold"], again["calls"]) == (len(first["calls"]), [])
    # One drain starts: still nothing to add. After the grace, the others count as lost.
    spawns = SpawnLedger(redis, settings.queue_name)
    spawns.started(first["calls"][0])
    assert plan_launch(settings, modal, redis, db).cold == len(first["calls"]) - 1
    later = plan_launch(settings, modal, redis, db, now=time.time() + 601)
    assert (later.cold, later.drains) == (0, first["plan"]["drains"])

    # A spawn that fails leaves no note behind.
    def refuse(budget: float, spawn_id: str) -> str:
        raise RuntimeError("no GPU")

    with pytest.raises(RuntimeError):
        run_launcher(settings, modal, redis, db, refuse)
    assert spawns.cold(600, now=time.time() + 601) == 0


def test_drain_budget_keeps_the_last_batch_under_the_timeout() -> None:
    modal = ModalSettings(timeout=3600, drain_budget_s=3000)
    assert drain_budget(modal, 3000, job_timeout=540) == 3000
    assert drain_budget(modal, 200, job_timeout=540) == 200
    # RQ's job timeout must fall inside the margin: RQ, not Modal, ends a stuck batch.
    assert drain_budget(modal, 3000, job_timeout=1800) == 1800
    # A batch the ledger measured longer than the job timeout (enqueued with a longer one) widens it.
    assert drain_budget(modal, 3000, job_timeout=540, largest_batch_s=900.5) == 2699.5
    with pytest.raises(ConfigError, match="PODEMBED_MODAL_TIMEOUT=3600 leaves no drain time"):
        drain_budget(modal, 3000, job_timeout=3600)
    # The defaults agree: a drain runs its full budget.
    assert drain_budget(ModalSettings(), ModalSettings().drain_budget_s, job_timeout=Settings().job_timeout) == 3000


def test_launch_plan_clamps_the_budget_to_the_ledger(settings: Settings, redis: Redis, db: Database) -> None:
    _ingest(settings, redis, db, DATA / "E03.srt")
    db.batches.insert_one({"_id": "old", "model": settings.model, "n_tokens": 1000, "wall_seconds": 700.0,
                           "device": "NVIDIA A10G", "finished_at": datetime.now(UTC)})
    plan = plan_launch(settings, ModalSettings(timeout=3600, drain_budget_s=3000), redis, db)
    assert (plan.throughput.largest_batch_s, plan.drain_budget_s) == (700.0, 2900.0)
