"""Priority queues by kind of job (ingest, nightly, backfill) and the backfill's optional share.

The drills run real worker processes on real transcripts: a nightly job enqueued behind a long
backfill overtakes it, and with a share the backfill still advances while nightly work arrives.
Batch order is read from the MongoDB ledger: `started_at` is stamped as the fetch lane takes a
batch, so one worker's ledger in `started_at` order is the order it took batches off the queues.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pymongo.database import Database
from redis import Redis

from config.errors import ConfigError
from config.settings import Settings
from modal_jobs.launcher import first_clear_seconds, plan_launch, read_backlogs
from modal_jobs.settings import ModalSettings
from producer.batches.take import Idle, PriorityTake, credit_key
from producer.enqueue import EnqueuedJob, batch_queue, batch_queues, enqueue_episodes, parse_files, vector_spec
from producer.jobs import JobRecords
from producer.operations import cancel, retry
from tests.conftest import DATA, EXAMPLES, ROOT, run_cli, taking_drain
from tests.soak.harness import start_worker, wait_until, worker_env
from worker.loop import run_worker

# Small chunks in small batches: a backfill of many quick batches.
SMALL = {"chunk_tokens": 64, "chunk_overlap_tokens": 16}


def _enqueue(settings: Settings, redis: Redis, db: Database, paths: list[Path], kind: str, *,
             batch_chunks: int, podcast: str = "The Seen and the Unseen",
             queued_at: list[datetime] | None = None) -> EnqueuedJob:
    """Enqueue `paths` as one job of `kind`; `queued_at` gets the time each window was on the queue."""
    episodes, refused = parse_files(paths, podcast=podcast)
    assert refused == []
    chunked = settings.replace(batch_max_chunks=batch_chunks, **SMALL)
    stamp = None if queued_at is None else (lambda *_: queued_at.append(datetime.now(UTC)))
    return enqueue_episodes(chunked, redis, db, episodes, kind=kind, spec=vector_spec(chunked), on_window=stamp)


def _taken_order(db: Database) -> list[dict]:
    """The ledger in the order the (one) worker took the batches."""
    return list(db.batches.find({}, {"job_id": 1, "started_at": 1, "finished_at": 1}).sort("started_at", 1))


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def test_queue_settings_are_checked() -> None:
    s = Settings()
    assert s.queue_names() == ("podembed", "podembed-nightly", "podembed-backfill")
    assert Settings(queue_name="q").queue_names() == ("q", "q-nightly", "q-backfill")
    assert Settings.from_env({"PODEMBED_QUEUE_BACKFILL": "slow", "PODEMBED_BACKFILL_SHARE": "0.2"}).queue_for(
        "backfill") == "slow"
    for share in ("0", "1", "1.5", "-0.2"):
        with pytest.raises(ConfigError, match=r"^PODEMBED_BACKFILL_SHARE must be between 0 and 1 \(exclusive\)"):
            Settings.from_env({"PODEMBED_BACKFILL_SHARE": share})
    with pytest.raises(ConfigError, match="PODEMBED_BACKFILL_SHARE='lots' is not a valid"):
        Settings.from_env({"PODEMBED_BACKFILL_SHARE": "lots"})
    with pytest.raises(ConfigError, match="must be three different names"):
        Settings(queue_nightly="podembed")
    with pytest.raises(ConfigError, match="no queue for jobs of kind 'urgent'"):
        s.queue_for("urgent")


def test_takes_follow_priority_and_the_share_in_one_script(settings: Settings, redis: Redis) -> None:
    """The take script alone: ingest before nightly before backfill; with a share of 0.2, every fifth
    batch taken while the backfill and a higher queue both wait is a backfill batch."""
    queues = batch_queues(settings, redis)
    for queue, prefix, n in zip(queues, ("i", "n", "b"), (2, 8, 6), strict=True):
        for k in range(n):
            redis.rpush(queue.key, f"{prefix}{k}")

    strict = PriorityTake(redis, queues, None)
    order = [strict() for _ in range(17)]
    assert [t.batch_id for t in order[:16]] == ["i0", "i1", *(f"n{k}" for k in range(8)), *(f"b{k}" for k in range(6))]
    assert order[16] == Idle(due=None)
    assert [t.queue.name for t in order[:3:2]] == [settings.queue_name, settings.queue_names()[1]]
    # Each id sits in its own queue's intermediate list, as rq's own dequeue leaves it; no hash: gone.
    assert redis.llen(queues[2].intermediate_queue_key) == 6 and order[0].raw == {}

    for queue in queues:
        redis.delete(queue.key, queue.intermediate_queue_key)
    for queue, prefix, n in zip(queues, ("i", "n", "b"), (2, 8, 6), strict=True):
        for k in range(n):
            redis.rpush(queue.key, f"{prefix}{k}")
    shared = PriorityTake(redis, queues, 0.2)
    taken = [shared().batch_id for _ in range(16)]
    assert taken == ["i0", "i1", "n0", "n1", "b0", "n2", "n3", "n4", "n5", "b1", "n6", "n7",
                     "b2", "b3", "b4", "b5"]
    # The credit is one for all workers, in Redis: 12 contended takes earned 2.4, 2 were paid back; the
    # backfill's takes alone earned nothing.
    assert int(redis.get(credit_key(queues[2].name))) == 400_000

    # Every queue empty: the answer says when the earliest scheduled retry of any of them falls due.
    redis.zadd(queues[2].scheduled_job_registry.key, {"b9": 1_900_000_000})
    redis.zadd(queues[1].scheduled_job_registry.key, {"n9": 1_800_000_000.5, "n8": 1_850_000_000})
    assert shared() == Idle(due=1_800_000_000.5)


def test_put_back_returns_each_batch_to_the_front_of_its_own_queue(
    settings: Settings, redis: Redis, db: Database
) -> None:
    backfill = _enqueue(settings, redis, db, [DATA / "E03.srt"], "backfill", batch_chunks=10)
    ingest = _enqueue(settings, redis, db, [EXAMPLES / "E05.vtt"], "ingest", batch_chunks=30)
    queues = batch_queues(settings, redis)
    ingest_order, backfill_order = queues[0].job_ids, queues[2].job_ids
    assert (len(ingest_order), len(backfill_order)) == (ingest.batches, backfill.batches) == (2, 5)
    drain = taking_drain(settings, redis)
    held = [drain.take() for _ in range(4)]
    assert [h.batch_id for h in held] == [*ingest_order, *backfill_order[:2]]
    assert [h.rq_job.get_status() for h in held] == ["started"] * 4
    drain.put_back(held)
    assert (queues[0].job_ids, queues[1].job_ids, queues[2].job_ids) == (ingest_order, [], backfill_order)
    assert all(redis.llen(q.intermediate_queue_key) == 0 and q.started_job_registry.count == 0 for q in queues)


def test_failures_retry_and_cancel_stay_on_the_jobs_own_queue(settings: Settings, redis: Redis, db: Database) -> None:
    job = _enqueue(settings, redis, db, [DATA / "E03.srt"], "backfill", batch_chunks=20)
    ingest_queue, _, backfill_queue = batch_queues(settings, redis)
    records = JobRecords(redis, db, settings.result_ttl)
    assert records.status(job.job_id).queue == backfill_queue.name
    assert db.jobs.find_one({"_id": job.job_id})["queue"] == backfill_queue.name
    assert (ingest_queue.count, backfill_queue.count) == (0, job.batches) == (0, 3)

    run_worker(settings.replace(max_forward_tokens=1), burst=True, redis=redis)  # refused for good
    assert backfill_queue.failed_job_registry.count == 3 and ingest_queue.failed_job_registry.count == 0
    assert len(retry(settings, redis, db, job.job_id).requeued) == 3
    assert (ingest_queue.count, backfill_queue.count) == (0, 3)
    run_worker(settings, burst=True, redis=redis)
    assert records.status(job.job_id).state == "finished"

    later = _enqueue(settings, redis, db, [EXAMPLES / "E05.vtt"], "backfill", batch_chunks=20)
    removed = cancel(settings, redis, db, later.job_id).removed
    assert len(removed) == later.batches == backfill_queue.canceled_job_registry.count
    assert backfill_queue.count == 0

    shown = run_cli(settings, "status", job.job_id).stdout.splitlines()
    assert ["queue", backfill_queue.name] in [line.split() for line in shown]
    rows = [line.split() for line in run_cli(settings, "jobs").stdout.splitlines()]
    assert rows[0][-1] == "queue"
    assert [(r[0], r[1], r[-1]) for r in rows[1:]].count((job.job_id, "backfill", backfill_queue.name)) == 1


def test_launch_plan_shows_every_queue_and_when_the_first_clears(
    settings: Settings, redis: Redis, db: Database, tmp_path: Path
) -> None:
    nightly = _enqueue(settings, redis, db, [EXAMPLES / "E05.vtt"], "nightly", batch_chunks=15)
    backfill = _enqueue(settings, redis, db, [EXAMPLES / "E01.vtt"], "backfill", batch_chunks=10)
    names = settings.queue_names()
    queues = read_backlogs(settings, redis)
    assert list(queues) == list(names)
    assert [queues[n].batches for n in names] == [0, nightly.batches, backfill.batches] == [0, 3, 10]
    assert [queues[n].tokens for n in names] == [0, nightly.tokens, backfill.tokens]

    plan = plan_launch(settings.replace(default_tokens_per_second=100.0), ModalSettings(), redis, db)
    # One drain spawned for the whole backlog; the nightly queue is first, at 100 tokens/s on one container.
    assert (plan.drains, plan.first_queue) == (1, names[1])
    assert plan.first_clear_s == pytest.approx(nightly.tokens / 100, abs=0.1)
    # With a backfill share of 0.2 the nightly queue gets 80 % of the containers' time; 3 containers at most 3x.
    shared = settings.replace(backfill_share=0.2)
    assert first_clear_seconds(shared, queues, tokens_per_s=100.0, containers=1)[1] == pytest.approx(
        nightly.tokens / 80, abs=0.1)
    assert first_clear_seconds(settings, queues, tokens_per_s=100.0, containers=5)[1] == pytest.approx(
        nightly.tokens / 300, abs=0.1)

    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "PODEMBED_REDIS_URL": settings.redis_url, "PODEMBED_MONGO_URI": settings.mongo_uri,
           "PODEMBED_MONGO_DB": settings.mongo_db, "PODEMBED_DEFAULT_TOKENS_PER_SECOND": "100"}
    shown = subprocess.run([sys.executable, "-m", "worker.cli", "launch", "--dry-run", "--json"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert {n: q["batches"] for n, q in doc["queues"].items()} == {names[0]: 0, names[1]: 3, names[2]: 10}
    assert doc["first_queue"] == names[1] and doc["first_clear_s"] == plan.first_clear_s
    text = subprocess.run([sys.executable, "-m", "worker.cli", "launch", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120).stdout
    assert f"queue {names[2]}: 10 batches (10 queued" in text
    assert f"highest-priority backlog: queue {names[1]}, clears in about 0:00:" in text


def test_rq_info_shows_every_queue(settings: Settings, redis: Redis, db: Database) -> None:
    jobs = {kind: _enqueue(settings, redis, db, [path], kind, batch_chunks=20, podcast=kind)
            for kind, path in (("ingest", DATA / "E03.srt"), ("nightly", EXAMPLES / "E05.vtt"),
                               ("backfill", EXAMPLES / "E01.vtt"))}
    rq = Path(sys.executable).parent / "rq"
    out = subprocess.run([str(rq), "info", "--url", settings.redis_url, "--serializer", "json", "--only-queues",
                          "--raw", *settings.queue_names()], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for kind, job in jobs.items():
        assert f"queue {settings.queue_for(kind)} {job.batches}" in out.stdout


def test_a_nightly_job_overtakes_a_queued_backfill(
    settings: Settings, redis: Redis, db: Database, tmp_path: Path
) -> None:
    """One worker, one batch fetched ahead: the nightly job's batches are taken one after the other
    as soon as they are queued, and only the batches the worker already held finish before them."""
    prefetch = 1
    backfill = _enqueue(settings, redis, db, [DATA / "E06.vtt", EXAMPLES / "E01.vtt"], "backfill", batch_chunks=2)
    assert backfill.batches >= 50
    records = JobRecords(redis, db, settings.result_ttl)
    env = worker_env(settings.redis_url, settings.mongo_uri, settings.mongo_db, prefetch_batches=prefetch)
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        wait_until(lambda: records.status(backfill.job_id).batches.finished >= 3, timeout=120,
                   what=lambda: f"backfill under way\n{worker.log_tail()}")
        arrived: list[datetime] = []
        nightly = _enqueue(settings, redis, db, [EXAMPLES / "E05.vtt"], "nightly", batch_chunks=15,
                           queued_at=arrived)
        assert nightly.batches == 3 and len(arrived) == 1  # one window: all three queued at once
        wait_until(lambda: records.status(nightly.job_id).state == "finished", timeout=60,
                   what=lambda: f"nightly job\n{worker.log_tail()}")
        backfill_done = records.status(backfill.job_id).batches.finished
    finally:
        worker.stop()
    assert backfill_done < backfill.batches  # the backfill was still going when the nightly job ended

    queued_at = arrived[0]
    ledger = _taken_order(db)
    taken = [e["job_id"] for e in ledger]
    first = taken.index(nightly.job_id)
    # Strict priority: once queued, the nightly batches were the next three the worker took.
    assert taken[first:first + 3] == [nightly.job_id] * 3
    nightly_end = max(_utc(e["finished_at"]) for e in ledger if e["job_id"] == nightly.job_id)
    overtaken = [e for e in ledger
                 if e["job_id"] == backfill.job_id and queued_at < _utc(e["finished_at"]) <= nightly_end]
    # Only the batches the worker held when the nightly job arrived finished in between: at most two
    # fetched ahead (these 2-chunk batches are light: the fetch lane keeps a full batch of work ahead, in
    # at most prefetch + 1 batches), one on the model and two computed, waiting for or in the store lane.
    assert len(overtaken) <= prefetch + 4, [e["_id"] for e in overtaken]
    print(f"backfill batches finished while the nightly job ran: {len(overtaken)}")


def test_a_backfill_share_keeps_the_backfill_moving_while_nightly_work_arrives(
    settings: Settings, redis: Redis, db: Database, tmp_path: Path
) -> None:
    backfill = _enqueue(settings, redis, db, [DATA / "E06.vtt"], "backfill", batch_chunks=2)
    first = _enqueue(settings, redis, db, [EXAMPLES / "E01.vtt"], "nightly", batch_chunks=3, podcast="Night one")
    records = JobRecords(redis, db, settings.result_ttl)
    env = worker_env(settings.redis_url, settings.mongo_uri, settings.mongo_db, backfill_share=0.2)
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        wait_until(lambda: db.batches.count_documents({}) >= 1, timeout=120,
                   what=lambda: f"worker under way\n{worker.log_tail()}")
        second = _enqueue(settings, redis, db, [DATA / "E03.srt"], "nightly", batch_chunks=3, podcast="Night two")
        assert batch_queue(settings, redis, "nightly").count > second.batches  # it came while the first waited
        wait_until(lambda: records.status(second.job_id).state == "finished", timeout=90,
                   what=lambda: f"second nightly job\n{worker.log_tail()}")
    finally:
        worker.stop()
    taken = [e["job_id"] for e in _taken_order(db)]
    last_nightly = max(i for i, job_id in enumerate(taken) if job_id != backfill.job_id)
    contended = taken[:last_nightly + 1]
    # While nightly work waited, every fifth batch taken was the backfill's, and no other.
    assert [i + 1 for i, job_id in enumerate(contended) if job_id == backfill.job_id] == list(
        range(5, len(contended) + 1, 5))
    assert len(contended) >= first.batches + second.batches > 40
