"""The streaming, claim-check enqueue: windows reach the queue while the producer reads, batches carry
chunk ids only, stored vectors are never queued, and a killed producer's command resumes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import pytest
from pymongo.database import Database
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer

from config.errors import StoreError
from config.settings import Settings
from producer.enqueue import EnqueuedJob, JobStream, batch_queue, enqueue_episodes, ingest, parse_files, vector_spec
from producer.jobs import JOBS_INDEX, JobRecords
from producer.models import BatchTicket, Episode
from producer.operations import cancel
from producer.streaming import chunk_episodes, chunk_stream
from tests.bench.corpus import seenunseen_vtt
from tests.conftest import DATA, EXAMPLES, ROOT
from tests.soak.harness import audit, run_cli, wait_until, wait_until_value, worker_env
from worker.loop import run_worker

SHOW = "The Seen and the Unseen"
FILES = [EXAMPLES / "E01.vtt", EXAMPLES / "E05.vtt", EXAMPLES / "E06.json", DATA / "E03.srt"]


def test_windows_are_queued_while_the_producer_reads(settings: Settings, redis: Redis, db: Database) -> None:
    settings = settings.replace(enqueue_window_chunks=10, producer_processes=1)
    episodes, _ = parse_files(FILES, podcast=SHOW)
    records = JobRecords(redis, db, settings.result_ttl)
    seen: list[tuple[int, int, int, bool]] = []

    def window_done(job: EnqueuedJob, window: list[Episode]) -> None:
        status = records.status(job.job_id)
        seen.append((len(window), status.chunks.total, batch_queue(settings, redis).count, status.enqueue_done))

    job = enqueue_episodes(settings, redis, db, episodes, kind="ingest", spec=vector_spec(settings),
                           on_window=window_done)
    # Every episode of these has more than 10 chunks: one window each, on the queue before the next is read.
    assert [n for n, *_ in seen] == [1] * len(FILES)
    totals = [total for _, total, *_ in seen]
    assert totals == sorted(totals) and totals[-1] == job.chunks == len(chunk_episodes(settings, episodes,
                                                                                        vector_spec(settings)))
    assert all(queued > 0 and not done for *_, queued, done in seen)
    assert records.status(job.job_id).enqueue_done


def test_a_job_finishes_only_once_wholly_enqueued(settings: Settings, redis: Redis, db: Database) -> None:
    settings = settings.replace(producer_processes=1)
    episodes, _ = parse_files(FILES[:2], podcast=SHOW)
    records = JobRecords(redis, db, settings.result_ttl)
    stream = JobStream(settings, redis, db, kind="ingest", spec=vector_spec(settings))
    chunked = list(chunk_stream(settings, episodes, vector_spec(settings)))
    assert stream.add(chunked[:1])
    # A worker takes the first window's batches before the producer reads on: the job is not over.
    run_worker(settings, burst=True, redis=redis)
    status = records.status(stream.job.job_id)
    assert (status.state, status.enqueue_done, status.finished_at) == ("running", False, None)
    assert status.batches.finished == status.batches.total == stream.job.batches
    assert stream.add(chunked[1:])
    run_worker(settings, burst=True, redis=redis)
    assert records.status(stream.job.job_id).state == "running"
    job = stream.close()
    status = records.status(job.job_id)
    assert (status.state, status.enqueue_done, status.chunks.embedded) == ("finished", True, job.chunks)
    assert status.finished_at is not None


def test_batches_carry_chunk_ids_and_texts_wait_in_mongo(settings: Settings, redis: Redis, db: Database) -> None:
    episodes, _ = parse_files(FILES[:2], podcast=SHOW)
    job = ingest(settings, redis, db, episodes, kind="ingest")
    chunks = {c.chunk_id: c for c in chunk_episodes(settings, episodes, vector_spec(settings))}
    queued: list[str] = []
    for batch_id in batch_queue(settings, redis).get_job_ids():
        payload = Job.fetch(batch_id, redis, JSONSerializer).args[0]
        assert BatchTicket.from_payload(payload).batch_id == batch_id
        assert set(payload) == {"job_id", "batch_id", "spec", "chunk_ids", "force"}
        queued += payload["chunk_ids"]
        data = redis.hget(f"rq:job:{batch_id}", "data")
        assert chunks[payload["chunk_ids"][0]].text[:40].encode() not in zlib.decompress(data)
        # A few bytes per chunk (ids compress well): `make scale` measures what Redis holds in all.
        assert len(data) < 16 * len(payload["chunk_ids"])
    assert sorted(queued) == sorted(chunks)
    stored = {d["_id"]: d for d in db.chunks.find({})}
    assert stored.keys() == chunks.keys()
    assert all(stored[i]["text"] == c.text and stored[i]["podcast"] == SHOW for i, c in chunks.items())
    run_worker(settings, burst=True, redis=redis)
    assert JobRecords(redis, db, settings.result_ttl).status(job.job_id).chunks.embedded == job.chunks


def test_reingest_is_a_finished_job_of_skipped_chunks(settings: Settings, redis: Redis, db: Database) -> None:
    env = worker_env(settings.redis_url, settings.mongo_uri, settings.mongo_db)
    first = run_cli(env, "ingest", str(EXAMPLES / "E05.vtt"), "--podcast", SHOW, "--json")
    assert first.returncode == 0, first.stderr
    run_worker(settings, burst=True, redis=redis)
    again = run_cli(env, "ingest", str(EXAMPLES / "E05.vtt"), "--podcast", SHOW, "--json")
    assert again.returncode == 0, again.stderr
    doc = json.loads(again.stdout)
    assert (doc["batches"], doc["tokens"], doc["skipped"]) == (0, 0, doc["chunks"])
    assert batch_queue(settings, redis).count == 0
    status = JobRecords(redis, db, settings.result_ttl).status(doc["job_id"])
    assert (status.state, status.chunks.skipped, status.chunks.total) == ("finished", doc["chunks"], doc["chunks"])


def test_nothing_is_queued_when_mongo_cannot_keep_the_job(settings: Settings, redis: Redis,
                                                          unused_port: int) -> None:
    down = settings.replace(mongo_uri=f"mongodb://127.0.0.1:{unused_port}", mongo_timeout_ms=500)
    from producer.connections import mongo_database

    episodes, _ = parse_files([DATA / "E03.txt"])
    with pytest.raises(StoreError, match="MongoDB at mongodb://127.0.0.1"):
        ingest(down, redis, mongo_database(down), episodes, kind="ingest")
    assert batch_queue(settings, redis).count == 0 and redis.zcard(JOBS_INDEX) == 0


@pytest.fixture
def unused_port() -> int:
    from config.services import free_port

    return free_port()


def test_killed_producer_resumes_and_nothing_is_embedded_twice(settings: Settings, redis: Redis, db: Database,
                                                               tmp_path: Path) -> None:
    # The third file is a pipe nobody writes to yet: the producer blocks on it after two episodes' windows.
    for path in FILES[:2] + FILES[3:]:
        shutil.copy(path, tmp_path / path.name)
    stalled = tmp_path / "E99.vtt"
    os.mkfifo(stalled)
    paths = [str(tmp_path / FILES[0].name), str(tmp_path / FILES[1].name), str(stalled),
             str(tmp_path / FILES[3].name)]
    env = worker_env(settings.redis_url, settings.mongo_uri, settings.mongo_db, enqueue_window_chunks=10,
                     producer_processes=1)
    records = JobRecords(redis, db, settings.result_ttl)
    producer = subprocess.Popen([sys.executable, "-m", "worker.cli", "ingest", *paths, "--podcast", SHOW, "--json"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: redis.zcard(JOBS_INDEX) == 1 and records.status(
            redis.zrange(JOBS_INDEX, 0, 0)[0].decode()).episodes == 2, timeout=60, what="two episodes enqueued")
    finally:
        producer.send_signal(signal.SIGKILL)
        producer.wait()
    [first_id] = [j.decode() for j in redis.zrange(JOBS_INDEX, 0, -1)]
    first = records.status(first_id)
    # Its process is gone: `interrupted` at once, though what it enqueued is still queued.
    assert (first.enqueue_done, first.state, first.batches.queued) == (False, "interrupted", first.batches.total)

    stalled.unlink()
    shutil.copy(DATA / "E06.vtt", stalled)  # the pipe's episode, now readable
    again = run_cli(env, "ingest", *paths, "--podcast", SHOW, "--json")
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)
    assert second["episodes"] == 2  # the other two are left to the first job

    run_worker(settings, burst=True, redis=redis)
    assert records.status(first_id).state == "interrupted"
    assert records.status(second["job_id"]).state == "finished"
    episodes, _ = parse_files([Path(p) for p in paths], podcast=SHOW)
    chunk_ids = [c.chunk_id for c in chunk_episodes(settings, episodes, vector_spec(settings))]
    batch_ids = records.batch_ids(first_id) + records.batch_ids(second["job_id"])
    found = audit(db, first_id, chunk_ids, records.batch_ids(first_id))
    assert (found.lost, found.duplicated, found.vectors) == (0, 0, len(chunk_ids))
    # No chunk went through the model twice: the ledgers of both jobs add up to each chunk once.
    ledger = list(db.batches.find({"batch_id": {"$in": batch_ids}}))
    assert len(ledger) == len(batch_ids) and sum(e["n_embedded"] for e in ledger) == len(chunk_ids)


def test_status_watch_on_a_killed_producers_job_returns_interrupted_once_its_batches_ran(
    settings: Settings, redis: Redis, db: Database, tmp_path: Path
) -> None:
    # The second file is a pipe nobody writes to: the producer blocks on it with the first file's batches queued.
    shutil.copy(FILES[0], tmp_path / FILES[0].name)
    stalled = tmp_path / "E99.vtt"
    os.mkfifo(stalled)
    env = worker_env(settings.redis_url, settings.mongo_uri, settings.mongo_db, enqueue_window_chunks=10,
                     producer_processes=1)
    records = JobRecords(redis, db, settings.result_ttl)
    producer = subprocess.Popen([sys.executable, "-m", "worker.cli", "ingest", str(tmp_path / FILES[0].name),
                                 str(stalled), "--podcast", SHOW, "--json"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        job_id = wait_until_value(lambda: next((j.decode() for j in redis.zrange(JOBS_INDEX, 0, 0)), None),
                                  timeout=60, what="a job")
        wait_until(lambda: records.status(job_id).episodes == 1, timeout=60, what="the first file enqueued")
    finally:
        producer.send_signal(signal.SIGKILL)
        producer.wait()

    watch = [sys.executable, "-m", "worker.cli", "status", job_id, "--watch", "--json", "--interval", "0.1"]
    watcher = subprocess.Popen(watch, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert watcher.stderr is not None
        first = watcher.stderr.readline()  # its first poll: nothing has run, so it keeps watching
        run_worker(settings, burst=True, redis=redis)
        out, err = watcher.communicate(timeout=60)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, err
    total = records.status(job_id).chunks.total
    assert first.startswith(f"[{'.' * 30}] 0/{total} chunks") and first.rstrip().endswith("  interrupted")
    status = json.loads(out)
    assert (status["state"], status["enqueue_done"], status["episodes"]) == ("interrupted", False, 1)
    batches = status["batches"]
    assert (batches["queued"], batches["running"], batches["failed"]) == (0, 0, 0)
    assert batches["finished"] == batches["total"] > 0 and status["chunks"]["embedded"] == total
    assert err.splitlines()[-1].startswith(f"[{'#' * 30}] {total}/{total} chunks")

    # With nothing left to run, a watch returns at its first poll.
    again = run_cli(env, "status", job_id, "--watch", "--json", "--interval", "0.1")
    assert (again.returncode, json.loads(again.stdout)["state"], len(again.stderr.splitlines())) == (
        0, "interrupted", 1), again.stderr


def test_two_ctrl_cs_then_a_full_run_queue_every_chunk_once(settings: Settings, redis: Redis, db: Database,
                                                              tmp_path: Path) -> None:
    # Six real episodes; the third and fifth are pipes nobody writes to yet, where a run blocks: the first
    # run is stopped on the third, the second (which resumes the first) on the fifth, the third runs through.
    episodes = seenunseen_vtt()[:6]
    paths = [tmp_path / e.name for e in episodes]
    for path, episode in zip(paths, episodes, strict=True):
        if path in (paths[2], paths[4]):
            os.mkfifo(path)
        else:
            shutil.copy(episode, path)
    env = worker_env(settings.redis_url, settings.mongo_uri, settings.mongo_db, enqueue_window_chunks=10,
                     producer_processes=1)
    command = [sys.executable, "-m", "worker.cli", "ingest", *map(str, paths), "--podcast", SHOW, "--json"]
    records = JobRecords(redis, db, settings.result_ttl)
    stopped: list[str] = []
    for pipe in (paths[2], paths[4]):
        producer = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
        try:
            job_id = wait_until_value(lambda: next((j.decode() for j in redis.zrange(JOBS_INDEX, 0, -1)
                                                    if j.decode() not in stopped), None), timeout=60, what="a job")
            wait_until(lambda j=job_id: records.status(j).episodes == 2, timeout=60, what="two episodes enqueued")
        finally:
            producer.send_signal(signal.SIGINT)  # Ctrl-C while it waits on the pipe
            out, err = producer.communicate(timeout=60)
        assert (producer.returncode, out) == (130, ""), err
        status = records.status(job_id)  # at once, its batches still on the queue
        assert err.splitlines() == [f"podembed: job {job_id} interrupted: 2 episodes ({status.chunks.total} chunks) "
                                    "were enqueued and still run; run the same command again to enqueue the rest (it "
                                    "resumes: no chunk is queued twice)"]
        assert (status.state, status.enqueue_done, status.batches.queued) == ("interrupted", False,
                                                                             status.batches.total)
        stopped.append(job_id)
        pipe.unlink()
        shutil.copy(episodes[paths.index(pipe)], pipe)

    full = run_cli(env, "ingest", *map(str, paths), "--podcast", SHOW, "--json")
    assert full.returncode == 0, full.stderr
    last = json.loads(full.stdout)
    assert (last["episodes"], last["resumed_from"]) == (2, stopped[1])
    queued: Counter[str] = Counter()
    for job_id in [*stopped, last["job_id"]]:
        for batch in Job.fetch_many(records.batch_ids(job_id), connection=redis, serializer=JSONSerializer):
            queued.update(batch.args[0]["chunk_ids"])
    parsed, _ = parse_files(paths, podcast=SHOW)
    chunk_ids = [c.chunk_id for c in chunk_episodes(settings, parsed, vector_spec(settings))]
    assert sorted(queued) == sorted(chunk_ids) and max(queued.values()) == 1
    assert [records.status(j).episodes for j in [*stopped, last["job_id"]]] == [2, 2, 2]


def test_cancel_while_enqueueing_stops_the_producer(settings: Settings, redis: Redis, db: Database) -> None:
    settings = settings.replace(enqueue_window_chunks=10, producer_processes=1)
    episodes, _ = parse_files(FILES, podcast=SHOW)
    windows_seen: list[int] = []

    def cancel_after_first(job: EnqueuedJob, window: list[Episode]) -> None:
        windows_seen.append(job.batches)
        if len(windows_seen) == 1:
            assert cancel(settings, redis, db, job.job_id).state == "cancelled"

    job = enqueue_episodes(settings, redis, db, episodes, kind="ingest", spec=vector_spec(settings),
                           on_window=cancel_after_first)
    assert windows_seen == [job.batches] and job.episodes == 1
    status = JobRecords(redis, db, settings.result_ttl).status(job.job_id)
    assert (status.state, status.episodes) == ("cancelled", 1)
    assert batch_queue(settings, redis).count == 0
