"""Faults on real processes: a worker SIGKILLed or stopped with batches fetched ahead (the default
prefetch of one, or two), MongoDB and Redis restarted mid-run, poison batches.

Every drill ends with the audit: one vector per chunk, one ledger entry per batch, exact job
counters. Worker processes here beat and run maintenance every second, so recovery takes
seconds; `make soak` runs the drills with the default settings and reports recovery times.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pymongo.database import Database
from redis import Redis
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from safetensors.torch import load_file, save_file

from config.services import local_services, services_up
from config.settings import Settings
from producer.enqueue import EnqueuedJob, batch_queue, ingest, parse_files, vector_spec
from producer.job_status import JobStatus
from producer.jobs import JobRecords
from producer.models import Chunk
from producer.operations import retry
from producer.streaming import chunk_episodes
from producer.tokens import load_tokenizer
from tests.conftest import DATA, EXAMPLES
from tests.soak.harness import (
    audit,
    counters_exact,
    run_cli,
    start_worker,
    wait_until,
    wait_until_value,
    worker_env,
)
from worker import embedder as embedder_module
from worker.loop import run_worker
from worker.store import from_bson_vector

# Beats, maintenance passes and idle waits of 1 s; one chunk per forward pass, so batches last a while.
FAST = {"heartbeat_interval": 1, "maintenance_interval": 1, "micro_batch_size": 1}


def _enqueue(settings: Settings, redis: Redis, db: Database, paths: list[Path]) -> tuple[EnqueuedJob, list[Chunk]]:
    episodes, refused = parse_files(paths, podcast="The Seen and the Unseen")
    assert refused == []
    job = ingest(settings, redis, db, episodes, kind="ingest")
    return job, chunk_episodes(settings, episodes, vector_spec(settings))


def _assert_exactly_once(
    settings: Settings, redis: Redis, db: Database, job: EnqueuedJob, chunks: list[Chunk]
) -> JobStatus:
    records = JobRecords(redis, db, settings.result_ttl)
    status = records.status(job.job_id)
    chunk_ids = [c.chunk_id for c in chunks]
    found = audit(db, job.job_id, chunk_ids, records.batch_ids(job.job_id))
    assert counters_exact(status), status
    assert status.chunks.embedded == status.chunks.total == len(chunk_ids) == found.chunks
    assert status.chunks.skipped == 0
    assert found.exact and found.vectors == len(chunk_ids), found
    assert found.ledger_entries == status.batches.total == job.batches
    ledger = list(db.batches.find({"job_id": job.job_id}))
    assert sum(e["n_embedded"] for e in ledger) == len(chunk_ids)
    assert status.gpu_seconds == pytest.approx(sum(e["gpu_seconds"] for e in ledger), rel=1e-6)
    assert FailedJobRegistry(settings.queue_name, connection=redis, serializer=JSONSerializer).count == 0
    return status


def _retries_used(settings: Settings, redis: Redis, batch_ids: list[str]) -> int:
    jobs = Job.fetch_many(batch_ids, connection=redis, serializer=JSONSerializer)
    return sum(len(settings.retry_intervals) - job.retries_left for job in jobs if job is not None)


def _ahead(started: StartedJobRegistry, redis: Redis, job_id: str) -> list[str] | None:
    """The batches a worker holds once it has one on the model and one fetched ahead, and has stored one."""
    held = started.get_job_ids(cleanup=False)
    return held if len(held) >= 2 and redis.scard(f"podembed:job:{job_id}:done") >= 1 else None


def test_worker_killed_with_a_batch_fetched_ahead_loses_and_duplicates_nothing(
    settings: Settings, redis: Redis, db: Database, tmp_path: Path
) -> None:
    settings = settings.replace(batch_max_chunks=6)
    job, chunks = _enqueue(settings, redis, db, [EXAMPLES / "E01.vtt", DATA / "E03.srt"])
    records = JobRecords(redis, db, settings.result_ttl)
    started = StartedJobRegistry(settings.queue_name, connection=redis, serializer=JSONSerializer)
    env = worker_env(settings.redis_url, settings.mongo_uri, settings.mongo_db, **FAST)

    first = start_worker(env, tmp_path / "first.log")
    try:
        wait_until(lambda: _ahead(started, redis, job.job_id), timeout=120,
                   what="first worker with a batch on the model and one fetched ahead")
        first.kill()
    finally:
        first.stop()
    # One may have been counted already (killed between its counters and rq's finish): run again, it
    # is not counted twice, and keeps the ledger entry of the run that was counted.
    killed = started.get_job_ids(cleanup=False)
    assert len(killed) >= 2
    counted_by_first = {b for b in killed if records.counted(job.job_id, b)}

    second = start_worker(env, tmp_path / "second.log")
    try:
        seconds = wait_until(lambda: records.status(job.job_id).state == "finished", timeout=120,
                             what=lambda: f"job after the kill\n{second.log_tail()}")
    finally:
        second.stop()
    _assert_exactly_once(settings, redis, db, job, chunks)
    # RQ's abandoned-job cleanup retried every batch the dead worker held (one retry each), prefetched ones too.
    assert _retries_used(settings, redis, killed) == len(killed)
    for batch_id in killed:
        ran = first if batch_id in counted_by_first else second
        assert db.batches.find_one({"_id": batch_id})["worker"].endswith(f":{ran.process.pid}"), batch_id
    assert seconds < 60


def test_sigterm_puts_batches_fetched_ahead_back_at_once(
    settings: Settings, redis: Redis, db: Database, tmp_path: Path
) -> None:
    settings = settings.replace(batch_max_chunks=6)
    job, chunks = _enqueue(settings, redis, db, [EXAMPLES / "E01.vtt", DATA / "E03.srt"])
    records = JobRecords(redis, db, settings.result_ttl)
    queue = batch_queue(settings, redis)
    order = records.batch_ids(job.job_id)
    started = StartedJobRegistry(settings.queue_name, connection=redis, serializer=JSONSerializer)
    env = worker_env(settings.redis_url, settings.mongo_uri, settings.mongo_db, prefetch_batches=2, **FAST)

    worker = start_worker(env, tmp_path / "worker.log")
    try:
        held = wait_until_value(lambda: _ahead(started, redis, job.job_id), timeout=120,
                                what="worker with batches fetched ahead")
        os.killpg(worker.process.pid, signal.SIGTERM)
        worker.process.wait(timeout=60)
    finally:
        worker.stop()
    assert worker.process.returncode == 0, worker.log_tail()
    done = {b.decode() for b in redis.smembers(f"podembed:job:{job.job_id}:done")}
    # The batch on the model (and the one being stored) finished; those fetched ahead went back to the
    # front of the queue in their order, without using a retry; nothing is left started.
    assert started.get_job_ids(cleanup=False) == []
    assert queue.job_ids == [b for b in order if b not in done]
    put_back = [b for b in held if b not in done]
    assert put_back and queue.job_ids[:len(put_back)] == put_back
    assert _retries_used(settings, redis, order) == 0
    assert "put back at the front of queue" in worker.log.read_text()

    run_worker(settings, burst=True, redis=redis)
    _assert_exactly_once(settings, redis, db, job, chunks)


def test_mongo_outage_mid_run_backs_off_and_loses_nothing(
    settings: Settings, redis: Redis, db: Database, tmp_path: Path
) -> None:
    settings = settings.replace(batch_max_chunks=4, retry_intervals=(1, 2, 4, 8, 8))
    job, chunks = _enqueue(settings, redis, db, [DATA / "E03.srt", EXAMPLES / "E05.vtt"])
    records = JobRecords(redis, db, settings.result_ttl)
    started = StartedJobRegistry(settings.queue_name, connection=redis, serializer=JSONSerializer)
    mongo = local_services(settings)[1]
    worker = start_worker(worker_env(settings.redis_url, settings.mongo_uri, settings.mongo_db,
                                     mongo_timeout_ms=1000, **FAST), tmp_path / "worker.log")
    try:
        wait_until(lambda: _ahead(started, redis, job.job_id), timeout=120,
                   what="first batch stored and one fetched ahead")
        mongo.stop()
        wait_until(lambda: worker.log.read_text().count("will retry") >= 2, timeout=60,
                   what="batches failing while MongoDB is down")
        services_up(settings)
        wait_until(lambda: records.status(job.job_id).state == "finished", timeout=120,
                   what=lambda: f"job after MongoDB came back\n{worker.log_tail()}")
    finally:
        services_up(settings)
        worker.stop()
    _assert_exactly_once(settings, redis, db, job, chunks)
    assert _retries_used(settings, redis, records.batch_ids(job.job_id)) >= 2


def test_redis_restart_mid_run_keeps_queued_batches(
    settings: Settings, redis: Redis, db: Database, tmp_path: Path
) -> None:
    settings = settings.replace(batch_max_chunks=4)
    job, chunks = _enqueue(settings, redis, db, [DATA / "E03.srt", EXAMPLES / "E05.vtt"])
    records = JobRecords(redis, db, settings.result_ttl)
    queue = batch_queue(settings, redis)
    started = StartedJobRegistry(settings.queue_name, connection=redis, serializer=JSONSerializer)
    redis_service = local_services(settings)[0]
    env = worker_env(settings.redis_url, settings.mongo_uri, settings.mongo_db, **FAST)
    first = start_worker(env, tmp_path / "first.log")
    try:
        held = wait_until_value(lambda: _ahead(started, redis, job.job_id), timeout=120,
                                what="worker with a batch on the model and one fetched ahead")
        redis_service.stop()
        # The batch ends while Redis is away: it cannot be counted, and the worker gives up.
        wait_until(lambda: first.process.poll() is not None, timeout=60, what="worker ending without Redis")
        services_up(settings)
    finally:
        services_up(settings)
        first.stop()
    assert first.process.returncode != 0
    # The append-only file kept every batch: queued, held by the dead worker, or counted.
    done = {b.decode() for b in redis.smembers(f"podembed:job:{job.job_id}:done")}
    held = started.get_job_ids(cleanup=False)
    assert held and not set(held) & done
    assert sorted({*queue.job_ids, *held, *done}) == records.batch_ids(job.job_id)

    second = start_worker(env, tmp_path / "second.log")  # as its supervisor would restart it
    try:
        wait_until(lambda: records.status(job.job_id).state == "finished", timeout=120,
                   what=lambda: f"job after the Redis restart\n{second.log_tail()}")
    finally:
        second.stop()
    _assert_exactly_once(settings, redis, db, job, chunks)
    assert _retries_used(settings, redis, held) == len(held)


def _cli_env(settings: Settings) -> dict[str, str]:
    return worker_env(settings.redis_url, settings.mongo_uri, settings.mongo_db)


def test_batch_over_the_token_cap_fails_alone_and_retry_completes_it(
    settings: Settings, redis: Redis, db: Database
) -> None:
    # An hour's back-off: only a batch that is not retried can be failed by the end of this burst.
    settings = settings.replace(batch_max_chunks=4, retry_intervals=(3600,))
    job, chunks = _enqueue(settings, redis, db, [DATA / "E03.srt"])
    records = JobRecords(redis, db, settings.result_ttl)
    embedder = embedder_module.get_embedder(settings.model_source(), revision=None, pool_instruction=True)
    longest = max(c.n_tokens for c in chunks) + embedder.prompt_tokens(settings.instruction)
    # A forward-token cap one below the longest chunk: that chunk fits on no device, the others do.
    run_worker(settings.replace(max_forward_tokens=longest - 1), burst=True, redis=redis)

    status = records.status(job.job_id)
    poisoned = f"{job.job_id}-00000"  # batches are packed longest first
    assert status.state == "partial"
    assert (status.batches.failed, status.batches.finished) == (1, job.batches - 1)
    assert (status.chunks.failed, status.chunks.embedded, status.chunks.pending) == (4, len(chunks) - 4, 0)
    assert status.errors == {poisoned: f"EmbeddingError: a single text of {longest} tokens does not fit on cpu"}
    assert FailedJobRegistry(settings.queue_name, connection=redis, serializer=JSONSerializer).get_job_ids() == [
        poisoned]
    shown = run_cli(_cli_env(settings), "status", job.job_id)
    assert shown.returncode == 0, shown.stderr
    assert f"error {poisoned}  EmbeddingError: a single text of {longest} tokens does not fit on cpu" in shown.stdout
    assert json.loads(run_cli(_cli_env(settings), "status", job.job_id, "--json").stdout)["errors"] == status.errors

    # The cause fixed (no cap), `retry` puts the batch back and the job completes.
    retried = run_cli(_cli_env(settings), "retry", job.job_id, "--json")
    assert retried.returncode == 0, retried.stderr
    assert json.loads(retried.stdout)["requeued"] == [poisoned]
    run_worker(settings, burst=True, redis=redis)
    assert _assert_exactly_once(settings, redis, db, job, chunks).errors == {}


def _poisoned_model(source: Path, token_id: int, into: Path) -> Path:
    """The bundled model with one row of its token embeddings set to NaN: texts holding that token
    come out non-finite, every other text exactly as before."""
    into.mkdir()
    for entry in source.iterdir():
        if entry.name != "model.safetensors":
            (into / entry.name).symlink_to(entry)
    weights = load_file(source / "model.safetensors")
    [name] = [k for k in weights if k.endswith("word_embeddings.weight")]
    weights[name][token_id] = float("nan")
    save_file(weights, into / "model.safetensors", metadata={"format": "pt"})
    return into


def test_non_finite_vectors_fail_their_batch_and_retry_with_a_sound_model_completes(
    settings: Settings, redis: Redis, db: Database, tmp_path: Path
) -> None:
    settings = settings.replace(batch_max_chunks=4)
    job, chunks = _enqueue(settings, redis, db, [DATA / "E03.srt"])
    records = JobRecords(redis, db, settings.result_ttl)
    tokenizer = load_tokenizer(settings).tokenizer
    # A token of exactly one chunk, and not of the instruction or the loader's warm-up text.
    common = set(tokenizer.encode(settings.instruction).ids) | set(tokenizer.encode("warm-up").ids)
    holders = Counter(t for c in chunks for t in set(tokenizer.encode(c.text).ids) - common)
    token = min(t for t, n in holders.items() if n == 1)
    [victim] = [c for c in chunks if token in tokenizer.encode(c.text).ids]
    [poisoned] = [b for b in records.batch_ids(job.job_id)
                  if victim.chunk_id in Job.fetch(b, redis, JSONSerializer).args[0]["chunk_ids"]]
    model = _poisoned_model(Path(settings.model_source()), token, tmp_path / "poisoned")
    run_worker(settings.replace(model_path=str(model)), burst=True, redis=redis)

    status = records.status(job.job_id)
    assert status.state == "partial" and status.batches.failed == 1
    assert list(status.errors) == [poisoned]
    assert status.errors[poisoned].startswith("EmbeddingError: model produced non-finite vectors for 1 of ")
    assert db.embeddings.find_one({"chunk_id": victim.chunk_id}) is None
    assert all(np.isfinite(from_bson_vector(d["embedding"])).all() for d in db.embeddings.find())

    assert retry(settings, redis, db, job.job_id).requeued == [poisoned]
    run_worker(settings, burst=True, redis=redis)
    _assert_exactly_once(settings, redis, db, job, chunks)
    sound = embedder_module.get_embedder(settings.model_source(), revision=None, pool_instruction=True).model
    expected = sound.encode([victim.text], prompt=settings.instruction, normalize_embeddings=True)[0]
    stored = from_bson_vector(db.embeddings.find_one({"chunk_id": victim.chunk_id})["embedding"])
    assert float(np.dot(stored, expected)) > 0.9999
