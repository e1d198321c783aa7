"""The pipelined drain in this process: retries that fall due within the budget, a stop with batches
fetched ahead, and jobs rq cannot load (poison) in every place rq meets them."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from pymongo.database import Database
from redis import Redis
from rq import Queue, Worker
from rq.exceptions import DeserializationError
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import now

from config.settings import Settings
from producer.batches import upkeep
from producer.batches.upkeep import scheduler_for
from producer.enqueue import EnqueuedJob, batch_queue, ingest, parse_files
from producer.jobs import JobRecords
from tests.conftest import DATA, EXAMPLES, taking_drain
from tests.soak.harness import audit, counters_exact, wait_until
from worker.lanes import Ahead, Held, prepare
from worker.loop import drain, make_worker
from worker.pipeline import Drain, Housekeeper

FAST = {"heartbeat_interval": 1, "maintenance_interval": 1}


def _ingest(settings: Settings, redis: Redis, db: Database, path: Path) -> EnqueuedJob:
    episodes, refused = parse_files([path], podcast="The Seen and the Unseen")
    assert refused == []
    return ingest(settings, redis, db, episodes, kind="ingest")


def _exactly_once(settings: Settings, redis: Redis, db: Database, job: EnqueuedJob) -> None:
    records = JobRecords(redis, db, settings.result_ttl)
    status = records.status(job.job_id)
    assert counters_exact(status), status
    chunk_ids = [d["chunk_id"] for d in db.embeddings.find({"job_id": job.job_id}, {"chunk_id": 1})]
    found = audit(db, job.job_id, chunk_ids, records.batch_ids(job.job_id))
    assert found.exact and found.vectors == job.chunks == status.chunks.embedded, found


def test_drain_waits_for_a_retry_due_within_its_budget(settings: Settings, redis: Redis, db: Database) -> None:
    settings = settings.replace(batch_max_chunks=8, retry_intervals=(3,), **FAST)
    job = _ingest(settings, redis, db, EXAMPLES / "E05.vtt")
    queue = batch_queue(settings, redis)
    backing_off = queue.job_ids[-1]
    queue.remove(backing_off)
    worker, _ = make_worker(settings, redis)
    first = drain(worker)
    assert first.batches == job.batches - 1
    # The last batch failed a moment ago and waits out a 3 s back-off, as rq's Retry leaves it.
    queue.schedule_job(Job.fetch(backing_off, redis, JSONSerializer), now() + timedelta(seconds=3))

    # A budget that ends before the retry is due: the drain ends at once, the retry stays scheduled.
    short = drain(worker, time_budget_s=1)
    assert short.batches == 0
    assert queue.scheduled_job_registry.get_job_ids() == [backing_off]

    # A budget that covers it: the drain keeps going until the retry has run.
    rest = drain(worker, time_budget_s=60)
    assert (rest.batches, rest.failed) == (1, 0)
    assert queue.scheduled_job_registry.count == 0
    _exactly_once(settings, redis, db, job)


def test_a_stop_puts_fetched_batches_back_at_the_front_in_order(
    settings: Settings, redis: Redis, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    # Three batches fetched ahead, one chunk per forward pass: SIGTERM comes while the first is on the model.
    settings = settings.replace(batch_max_chunks=4, prefetch_batches=3, micro_batch_size=1, **FAST)
    episodes, _ = parse_files([EXAMPLES / "E01.vtt", DATA / "E03.srt"], podcast="The Seen and the Unseen")
    job = ingest(settings, redis, db, episodes, kind="ingest")
    queue = batch_queue(settings, redis)
    order = queue.job_ids
    assert len(order) >= 6
    records = JobRecords(redis, db, settings.result_ttl)
    started = StartedJobRegistry(settings.queue_name, connection=redis, serializer=JSONSerializer)
    worker, _ = make_worker(settings, redis)

    def stop_once_ahead() -> None:
        wait_until(lambda: started.count >= 3, timeout=120, what="three batches held")
        os.kill(os.getpid(), signal.SIGTERM)  # the drain's handler, as `podembed work` gets it

    threading.Thread(target=stop_once_ahead, daemon=True).start()
    with caplog.at_level(logging.INFO, logger="worker.pipeline"):
        spent = drain(worker)
    put_back = [b for r in caplog.records if "put back at the front" in r.getMessage()
                for b in r.getMessage().rsplit(": ", 1)[1].split(", ")]
    done = {b.decode() for b in redis.smembers(f"podembed:job:{job.job_id}:done")}
    assert spent.batches == len(done) >= 1
    # Nothing is left started; what was not finished is queued again, first, in its order, no retry used.
    assert started.count == 0
    assert put_back and queue.job_ids[:len(put_back)] == sorted(put_back, key=order.index)
    assert queue.job_ids == [b for b in order if b not in done]
    assert all(j.retries_left == 1 for j in Job.fetch_many(queue.job_ids, redis, JSONSerializer))
    assert records.status(job.job_id).batches.running == 0

    drain(worker)
    _exactly_once(settings, redis, db, job)


def test_the_fetch_lane_keeps_a_full_batch_of_work_ahead(settings: Settings, redis: Redis, db: Database) -> None:
    """A light batch (a job's last few chunks) does not fill the room ahead of the model: the fetch lane
    takes one more after it, and never holds more than prefetch + 1 batches."""
    settings = settings.replace(batch_max_chunks=8, prefetch_batches=1)
    jobs = [_ingest(settings, redis, db, EXAMPLES / name) for name in ("E05.vtt", "E01.vtt", "E06.json")]
    d = taking_drain(settings, redis)
    ctx = d.ctx
    held = []
    for _ in range(sum(job.batches for job in jobs)):
        taken = d.take()
        taken.prepared = prepare(ctx, taken)  # type: ignore[union-attr]
        held.append(taken)
    full = [h for h in held if len(h.prepared.groups) == 8]
    light = sorted((h for h in held if len(h.prepared.groups) < 8), key=lambda h: len(h.prepared.groups))
    assert sum(len(h.prepared.groups) for h in light[:2]) < 8
    assert len(full) >= 2 and len(light) >= 2, [len(h.prepared.groups) for h in held]

    ahead = Ahead(settings)
    assert ahead.reserve(0)
    assert not ahead.reserve(0)  # a batch being fetched weighs a full one until it is known
    ahead.fetched(light[0])
    assert ahead.reserve(0)  # less than a full batch of work ahead: one more
    ahead.fetched(full[0])
    assert not ahead.reserve(0)
    ahead.started(light[0])
    assert not ahead.reserve(0)  # a full batch of work ahead
    ahead.started(full[0])
    for batch in light[:2]:
        assert ahead.reserve(0)
        ahead.fetched(batch)
    assert not ahead.reserve(0)  # light, but prefetch + 1 batches already
    d.put_back(held)
    assert sum(q.count for q in d.queues) == len(held)


def test_a_take_clears_rqs_stuck_mark_of_the_batch(settings: Settings, redis: Redis, db: Database) -> None:
    """rq's maintenance marks a batch it sees in the intermediate list (between a take and its registration)
    and fails it as stuck if it sees it there again a minute later: the registration clears the mark."""
    _ingest(settings, redis, db, EXAMPLES / "E05.vtt")
    d = taking_drain(settings, redis)
    intermediate = d.queues[0].intermediate_queue
    first = d.queues[0].job_ids[0]
    assert intermediate.set_first_seen(first)  # as a maintenance pass during an earlier take would
    held = d.take()
    assert held.batch_id == first and intermediate.get_first_seen(first) is None  # type: ignore[union-attr]


def test_rq_reads_back_the_batch_a_worker_runs_with_the_json_serializer(
    settings: Settings, redis: Redis, db: Database
) -> None:
    """What rq-dashboard's Workers page shows of a worker's current batch (`serialize_current_job`). Our
    worker records it as rq does: read with the JSON serializer, it is the batch. rq-dashboard 0.9.0 reads
    workers with `Worker.all(connection=...)`, no serializer, even under `--json`: rq then unpickles the
    JSON batch and raises, which is the 500 its Workers page answers while a batch runs."""
    _ingest(settings, redis, db, EXAMPLES / "E05.vtt")
    d = taking_drain(settings, redis)
    d.worker.register_birth()
    held = d.take()
    assert isinstance(held, Held)
    [worker] = Worker.all(connection=redis, serializer=JSONSerializer)
    current = worker.get_current_job()
    assert current is not None and current.id == held.batch_id
    assert current.get_call_string().startswith("worker.tasks.embed_batch({'job_id': ")
    [as_the_dashboard_reads_it] = Worker.all(connection=redis)
    with pytest.raises(DeserializationError):
        as_the_dashboard_reads_it.get_current_job().get_call_string()  # type: ignore[union-attr]


def _abandoned(settings: Settings, redis: Redis, db: Database) -> tuple[Drain, Held]:
    """A batch taken by a drain whose worker then died: its registration as started has lapsed."""
    _ingest(settings, redis, db, EXAMPLES / "E05.vtt")
    d = taking_drain(settings, redis)
    held = d.take()
    assert isinstance(held, Held)
    redis.zadd(d.queues[0].started_job_registry.key, {f"{held.batch_id}:{held.execution.id}": time.time() - 60})
    return d, held


def test_a_maintenance_pass_after_the_first_stops_once_the_drain_ends(
    settings: Settings, redis: Redis, db: Database
) -> None:
    """A pass is a few dozen round trips (seconds a WAN away): the drain's end waits for the housekeeper,
    so only a drain's first pass runs whole once the drain ends (a burst drain of an empty queue still
    recovers abandoned batches)."""
    d, held = _abandoned(settings, redis, db)
    d.scheduler = scheduler_for(d.queues, f"{d.worker.name}:scheduler")
    started = d.queues[0].started_job_registry
    housekeeper = Housekeeper(d)
    housekeeper.done.set()

    housekeeper.maintain(whole=False)
    assert started.get_job_ids(cleanup=False) == [held.batch_id]
    housekeeper.maintain(whole=True)  # rq's abandoned-job cleanup: retried at once (no back-off here)
    assert started.get_job_ids(cleanup=False) == [] and held.batch_id in d.queues[0].job_ids


def test_a_worker_killed_mid_maintenance_holds_the_queues_cleanup_no_longer_than_its_batches(
    settings: Settings, redis: Redis, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rq's maintenance lock lasts 15 minutes: a worker killed during a pass kept every other worker from
    recovering its batches that long. Ours lapses no later than the dead worker's batch registrations."""
    d, held = _abandoned(settings, redis, db)
    queue = d.queues[0]
    started = queue.started_job_registry
    lock_ttl: list[int] = []

    clean = upkeep.clean_batch_registries

    def cleaning(q: Queue) -> None:  # mid-pass: the lock a worker killed now would leave behind
        lock_ttl.append(redis.ttl(q.registry_cleaning_key))
        clean(q)

    monkeypatch.setattr(upkeep, "clean_batch_registries", cleaning)
    upkeep.maintain(queue, d.worker, keep_seconds=settings.result_ttl)
    assert lock_ttl and 0 < lock_ttl[0] <= 3 * settings.heartbeat_interval
    assert started.get_job_ids(cleanup=False) == [] and held.batch_id in queue.job_ids  # recovered
    assert not redis.exists(queue.registry_cleaning_key)  # released at the end of the pass


def test_a_fleet_runs_one_periodic_maintenance_pass_per_queue_per_interval(
    settings: Settings, redis: Redis, db: Database
) -> None:
    """Every drain's housekeeper passes each interval: 16 drains ran 16 passes per queue per interval. The
    periodic pass is the fleet's, once per interval; a drain's first pass still runs (it recovers at once)."""
    d, held = _abandoned(settings, redis, db)
    queue = d.queues[0]
    other = make_worker(settings, redis, name="another-drain")[0]
    every = settings.maintenance_interval

    assert upkeep.maintain(queue, d.worker, keep_seconds=settings.result_ttl, every=every)
    assert held.batch_id in queue.job_ids  # the pass recovered the abandoned batch
    assert not upkeep.maintain(queue, other, keep_seconds=settings.result_ttl, every=every)
    assert not upkeep.maintain(queue, d.worker, keep_seconds=settings.result_ttl, every=every)
    assert 0 < redis.ttl(upkeep.recent_pass_key(queue)) <= every
    # A drain's first pass.
    assert upkeep.maintain(queue, other, keep_seconds=settings.result_ttl)
    # Each queue has its own interval.
    assert upkeep.maintain(d.queues[1], other, keep_seconds=settings.result_ttl, every=every)


def test_the_housekeeper_thread_counts_an_abandoned_batch_with_no_retries_left_failed(
    settings: Settings, redis: Redis, db: Database
) -> None:
    """The housekeeper is not the main thread: rq's cleanup ran the failure callback under SIGALRM, which
    cannot be set there, and skipped it; the batch was never counted failed and its job never ended."""
    d, held = _abandoned(settings, redis, db)
    queue = d.queues[0]
    redis.hset(held.rq_job.key, "retries_left", 0)
    job_id = held.ticket.job_id

    housekeeper = threading.Thread(target=upkeep.maintain, args=(queue, d.worker),
                                   kwargs={"keep_seconds": settings.result_ttl})
    housekeeper.start()
    housekeeper.join()
    assert held.batch_id in queue.failed_job_registry.get_job_ids()
    status = JobRecords(redis, db, settings.result_ttl).status(job_id)
    assert (status.batches.failed, status.chunks.failed) == (1, len(held.ticket.chunk_ids))
    assert "AbandonedJobError" in status.errors[held.batch_id]


def _poison(redis: Redis, job_id: str, data: bytes) -> None:
    """A job hash rq cannot load: valid data, a created_at that is not a date."""
    redis.hset(f"rq:job:{job_id}", mapping={"data": data, "created_at": "yesterday", "origin": "podembed",
                                            "status": "queued"})


def test_poison_jobs_are_taken_out_of_the_way_and_the_real_batch_finishes(
    settings: Settings, redis: Redis, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings.replace(**FAST)
    job = _ingest(settings, redis, db, EXAMPLES / "E05.vtt")
    queue = batch_queue(settings, redis)
    data = redis.hget(f"rq:job:{queue.job_ids[0]}", "data")
    for where in ("queued", "scheduled", "intermediate", "started"):
        _poison(redis, f"poison-{where}", data)
    redis.lpush(queue.key, "poison-queued")  # ahead of the real batches
    redis.zadd(queue.scheduled_job_registry.key, {"poison-scheduled": time.time() - 60})  # due
    redis.rpush(queue.intermediate_queue_key, "poison-intermediate")
    redis.zadd(queue.started_job_registry.key, {"poison-started:0": time.time() - 60})  # abandoned
    worker, _ = make_worker(settings, redis)

    with caplog.at_level(logging.ERROR, logger="producer.batches.job"):
        tally = drain(worker)
    assert (tally.batches, tally.failed) == (job.batches, 0)
    _exactly_once(settings, redis, db, job)
    evicted = {r.getMessage().split()[3] for r in caplog.records if "cannot be loaded" in r.getMessage()}
    assert evicted == {"poison-queued", "poison-scheduled", "poison-intermediate", "poison-started"}
    assert queue.job_ids == [] and queue.intermediate_queue.get_job_ids() == []
    assert queue.scheduled_job_registry.get_job_ids() == [] and queue.started_job_registry.count == 0
    # rq's locks were released when the drain ended, not left to expire.
    assert not redis.exists(queue.registry_cleaning_key, f"rq:scheduler-lock:{settings.queue_name}")
    # The hashes are kept a while for whoever looks into them.
    assert 0 < redis.ttl("rq:job:poison-queued") <= settings.result_ttl
