"""The launcher: backlog from the real queue, throughput from the real ledger, drains from both."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pymongo.database import Database
from redis import Redis
from rq import SimpleWorker

from config.settings import Settings
from modal_jobs.launcher import (
    Backlog,
    Throughput,
    drains_needed,
    launch,
    measured_throughput,
    plan_launch,
    read_backlog,
    run_nightly,
)
from modal_jobs.settings import ModalSettings
from modal_jobs.spawns import SpawnLedger
from producer.enqueue import batch_queue, ingest, parse_files
from tests.conftest import DATA, EXAMPLES, ROOT
from worker.loop import run_worker

# One drain for each launcher period of work: 8000 tokens/s x 300 s = 2.4M tokens.
CAPACITY = 8000 * 300


@pytest.mark.parametrize(("backlog", "running", "drains"), [
    (Backlog(batches=0, chunks=0, tokens=0), 0, 0),
    (Backlog(batches=1, chunks=3, tokens=700), 0, 1),
    (Backlog(batches=400, chunks=50_000, tokens=CAPACITY), 0, 1),
    (Backlog(batches=400, chunks=50_000, tokens=CAPACITY + 1), 0, 2),
    (Backlog(batches=2000, chunks=250_000, tokens=int(2.5 * CAPACITY)), 0, 3),
    (Backlog(batches=90_000, chunks=9_000_000, tokens=100 * CAPACITY), 0, 10),
    # A batch goes to one container: never more drains than batches.
    (Backlog(batches=3, chunks=384, tokens=100 * CAPACITY), 0, 3),
    # Workers already on the queue count against what is needed.
    (Backlog(batches=2000, chunks=250_000, tokens=int(2.5 * CAPACITY)), 2, 1),
    (Backlog(batches=2000, chunks=250_000, tokens=int(2.5 * CAPACITY)), 5, 0),
])
def test_drains_needed_for_backlogs(backlog: Backlog, running: int, drains: int) -> None:
    assert drains_needed(backlog, tokens_per_s=8000, work_s=300, max_containers=10,
                         running=running) == drains


def _ingest(settings: Settings, redis: Redis, db: Database, path: Path):
    episodes, refused = parse_files([path])
    assert refused == []
    return ingest(settings, redis, db, episodes, kind="ingest")


def test_plan_from_the_queue_without_history(settings: Settings, redis: Redis, db: Database) -> None:
    settings = settings.replace(batch_max_chunks=4)
    job = _ingest(settings, redis, db, EXAMPLES / "E01.vtt")
    assert read_backlog(settings, redis) == Backlog(batches=job.batches, chunks=job.chunks, tokens=job.tokens,
                                                    queued=job.batches)
    assert (job.batches, job.chunks, job.tokens) == (6, 21, 4904)

    plan = plan_launch(settings, ModalSettings(), redis, db)
    assert plan.throughput == Throughput(tokens_per_s=settings.default_tokens_per_second, measured_batches=0)
    assert (plan.drains, plan.running, plan.drain_budget_s, plan.max_containers) == (1, 0, 3000, 10)

    # A slow default spreads the same backlog: 4904 tokens at 1 token/s, 1000 s of work a drain, is 5 drains.
    slow = settings.replace(default_tokens_per_second=1.0)
    short = ModalSettings(drain_budget_s=1000, launcher_period_s=1000)
    assert plan_launch(slow, short, redis, db).drains == 5
    # ...of which a worker already on the queue is one.
    SimpleWorker([batch_queue(settings, redis)], connection=redis, name="already-draining").register_birth()
    busy = plan_launch(slow, short, redis, db)
    assert (busy.running, busy.drains) == (1, 4)

    spawned: list[float] = []
    spawns = SpawnLedger(redis, settings.queue_name)
    assert launch(busy, lambda budget, spawn_id: spawned.append(budget) or f"fc-{len(spawned)}", spawns) == [
        "fc-1", "fc-2", "fc-3", "fc-4"]
    assert spawned == [1000] * 4


def test_plan_gives_each_drain_a_launcher_period_of_work_not_a_budget(
        settings: Settings, redis: Redis, db: Database) -> None:
    """A backlog that fewer drains could clear within their budgets still gets one drain for each launcher
    period of its work, up to max_containers, so that it clears in about the least time the containers allow."""
    settings = settings.replace(batch_max_chunks=4, default_tokens_per_second=1.0)
    job = _ingest(settings, redis, db, EXAMPLES / "E01.vtt")
    assert (job.batches, job.tokens) == (6, 4904)

    # 4904 s of work: 2 drains of 3000 s budgets would do, taking 2452 s; 5 take 981 s.
    plan = plan_launch(settings, ModalSettings(launcher_period_s=1000), redis, db)
    assert (plan.drain_budget_s, plan.drains) == (3000, 5)
    # No more than max_containers, nor than batches.
    assert plan_launch(settings, ModalSettings(launcher_period_s=1000, max_containers=3), redis, db).drains == 3
    assert plan_launch(settings, ModalSettings(launcher_period_s=300), redis, db).drains == 6
    # A period longer than the budget: a budget's work a drain.
    assert plan_launch(settings, ModalSettings(drain_budget_s=2000, launcher_period_s=3000), redis, db).drains == 3


def test_plan_uses_the_throughput_measured_on_the_gpu(settings: Settings, redis: Redis, db: Database) -> None:
    _ingest(settings, redis, db, DATA / "E03.srt")
    run_worker(settings, burst=True, redis=redis)
    ledger = list(db.batches.find({}))
    expected = sum(e["n_tokens"] for e in ledger) / sum(e["wall_seconds"] for e in ledger)

    # The ledger's batches ran on "cpu": they measure a "cpu" launcher, not an A10G one.
    assert measured_throughput(db, model=settings.model, gpu="A10G") is None
    measured = measured_throughput(db, model=settings.model, gpu="cpu")
    assert measured == Throughput(tokens_per_s=pytest.approx(expected), measured_batches=len(ledger),
                                  largest_batch_s=max(e["wall_seconds"] for e in ledger))
    assert measured_throughput(db, model="hkunlp/instructor-xl", gpu="cpu") is None

    # An "A10G" deployment on hosts that torch calls "NVIDIA A10" (Modal does not tell them apart) measures
    # those batches; an "A10" one is not an A100.
    db.batches.update_many({}, {"$set": {"device": "NVIDIA A10"}})
    assert measured_throughput(db, model=settings.model, gpu="A10G") == measured
    assert measured_throughput(db, model=settings.model, gpu="A10") == measured
    db.batches.update_many({}, {"$set": {"device": "NVIDIA A100-SXM4-40GB"}})
    assert measured_throughput(db, model=settings.model, gpu="A10") is None
    db.batches.update_many({}, {"$set": {"device": "cpu"}})

    job = _ingest(settings, redis, db, EXAMPLES / "E05.vtt")
    plan = plan_launch(settings, ModalSettings(gpu="cpu"), redis, db)
    assert plan.throughput == measured
    assert plan.backlog.tokens == job.tokens
    assert plan.drains == 1


def test_nightly_then_launch(settings: Settings, redis: Redis, db: Database) -> None:
    db.transcripts.insert_one({"_id": "E03", "podcast": "The Seen and the Unseen",
                               "text": (DATA / "E03.srt").read_text()})
    spawned: list[float] = []
    result = run_nightly(settings, ModalSettings(), redis, db,
                         lambda budget, spawn_id: spawned.append(budget) or "fc-1")
    assert result["nightly"]["episodes"] == 1
    assert result["plan"]["backlog"]["batches"] == result["nightly"]["batches"] == 1
    assert result["plan"]["backlog"]["tokens"] == result["nightly"]["tokens"]
    assert (result["calls"], spawned) == (["fc-1"], [3000])
    again = run_nightly(settings, ModalSettings(), redis, db, lambda budget, spawn_id: "fc-2")
    # Nothing new, and the first night's drain has not started yet: nothing more to spawn.
    assert (again["nightly"]["episodes"], again["nightly"]["unchanged"], again["calls"]) == (0, 1, [])
    assert (again["plan"]["cold"], again["plan"]["backlog"]["batches"]) == (1, 1)


def _cli(settings: Settings, home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "HF_HUB_OFFLINE": "1", "PODEMBED_REDIS_URL": settings.redis_url,
           "PODEMBED_MONGO_URI": settings.mongo_uri, "PODEMBED_MONGO_DB": settings.mongo_db,
           "PODEMBED_MODAL_DRAIN_BUDGET_S": "600"}
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_launch(settings: Settings, redis: Redis, db: Database, tmp_path: Path) -> None:
    job = _ingest(settings, redis, db, DATA / "E03.srt")
    planned = _cli(settings, tmp_path, "launch", "--dry-run", "--json")
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    assert plan["backlog"] == {"batches": job.batches, "chunks": job.chunks, "tokens": job.tokens,
                               "queued": job.batches, "retries_due": 0, "abandoned": 0, "retries_later": 0,
                               "next_retry_in_s": None}
    assert (plan["drains"], plan["drain_budget_s"], plan["dry_run"], plan["calls"]) == (1, 600, True, [])

    # No Modal credentials here: the plan is printed, then a clear error and exit code 1.
    spawned = _cli(settings, tmp_path, "launch")
    assert spawned.returncode == 1
    assert "1 drain(s) of up to 600 s to spawn on A10 " in spawned.stdout
    assert "cannot spawn a drain on the Modal app 'podembed' (AuthError" in spawned.stderr
    assert "modal deploy modal_jobs/app.py" in spawned.stderr


def test_launch_and_costs_import_neither_torch_nor_modal() -> None:
    code = ("import sys, worker.cli, modal_jobs.launcher, modal_jobs.costs; "
            "print(sorted(m for m in ('torch', 'sentence_transformers', 'modal') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
