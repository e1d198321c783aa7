"""Ingest -> work -> status end to end, on real Redis, nx-27017, the small model and real transcripts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from pymongo.database import Database
from redis import Redis

from config.errors import JobNotFoundError
from config.settings import Settings
from producer.enqueue import batch_queue, ingest, parse_files
from producer.jobs import JOBS_INDEX, JobRecords
from producer.models import episode_key
from tests.conftest import DATA, EXAMPLES, ROOT
from tests.conftest import run_cli as _cli
from worker import embedder as embedder_module
from worker.loop import run_worker
from worker.store import from_bson_vector
from worker.tasks import STATUS_SAVE_SECONDS, init_context


def _ingest_and_drain(settings: Settings, redis: Redis, db: Database, paths) -> str:
    episodes, refused = parse_files(paths, podcast="The Seen and the Unseen")
    assert refused == []
    job = ingest(settings, redis, db, episodes, kind="ingest")
    run_worker(settings, burst=True, redis=redis)
    return job.job_id


def test_examples_end_to_end(settings: Settings, redis: Redis, db: Database) -> None:
    settings = settings.replace(batch_max_chunks=16)
    episodes, _ = parse_files([EXAMPLES])
    job_id = _ingest_and_drain(settings, redis, db, [EXAMPLES])

    status = JobRecords(redis, db, settings.result_ttl).status(job_id)
    docs = list(db.embeddings.find({"job_id": job_id}))
    assert status.state == "finished"
    assert status.episodes == len(episodes) == 3
    assert status.chunks.total == len(docs) == status.chunks.embedded
    assert status.chunks.skipped == status.chunks.failed == status.chunks.pending == 0
    assert status.batches.total == status.batches.finished == -(-len(docs) // 16)
    assert status.finished_at is not None
    assert {d["episode_id"] for d in docs} == {"E01", "E05", "E06"}
    assert len({d["_id"] for d in docs}) == len(docs)
    for doc in docs:
        vector = from_bson_vector(doc["embedding"])
        assert vector.shape == (384,) == (doc["dim"],)
        assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-4
        assert doc["chunk_id"] == f"{episode_key(doc['podcast'], doc['episode_id'])}:{doc['seq']}"

    ledger = list(db.batches.find({"job_id": job_id}))
    assert len(ledger) == status.batches.total
    assert sum(e["n_chunks"] for e in ledger) == status.chunks.total
    assert status.gpu_seconds == pytest.approx(sum(e["gpu_seconds"] for e in ledger), rel=1e-6)
    # A CPU batch is priced at the CPU rate, not the A10G's.
    assert status.cost_usd == pytest.approx(status.gpu_seconds * settings.price_per_hour("cpu") / 3600, rel=1e-6)
    assert settings.price_per_hour("cpu") == 0.047 < settings.price_per_hour("NVIDIA A10G") == 1.10
    assert all(e["padded_tokens"] >= e["n_tokens"] > 0 and e["device"] == "cpu" for e in ledger)
    # The history in Mongo agrees with the live record.
    assert db.jobs.find_one({"_id": job_id})["chunks"] == status.to_dict()["chunks"]


def test_stored_vector_is_the_model_vector(settings: Settings, redis: Redis, db: Database) -> None:
    _ingest_and_drain(settings, redis, db, [DATA / "E03.srt"])
    doc = db.embeddings.find_one({"episode_id": "E03", "seq": 2})
    model = embedder_module.get_embedder(settings.model_source(), revision=None, pool_instruction=True).model
    expected = model.encode([doc["text"]], prompt=settings.instruction, normalize_embeddings=True)[0]
    assert float(np.dot(from_bson_vector(doc["embedding"]), expected)) > 0.9999


def test_reingest_creates_nothing_and_counts_skipped(settings: Settings, redis: Redis, db: Database) -> None:
    first = _ingest_and_drain(settings, redis, db, [EXAMPLES / "E05.vtt"])
    count = db.embeddings.count_documents({})
    second = _ingest_and_drain(settings, redis, db, [EXAMPLES / "E05.vtt"])

    status = JobRecords(redis, db, settings.result_ttl).status(second)
    assert first != second
    assert db.embeddings.count_documents({}) == count
    assert status.state == "finished"
    assert status.chunks.skipped == status.chunks.total == count
    assert status.chunks.embedded == 0
    assert status.gpu_seconds == 0.0


def test_one_model_load_for_many_batches(settings: Settings, redis: Redis, db: Database) -> None:
    settings = settings.replace(batch_max_chunks=4)
    embedder_module.get_embedder(settings.model_source(), revision=None, pool_instruction=True)
    loads = embedder_module.load_count()
    job_id = _ingest_and_drain(settings, redis, db, [EXAMPLES / "E01.vtt"])
    status = JobRecords(redis, db, settings.result_ttl).status(job_id)
    assert status.batches.finished == status.batches.total >= 5
    assert embedder_module.load_count() == loads


def test_queue_holds_json_payloads(settings: Settings, redis: Redis, db: Database) -> None:
    episodes, _ = parse_files([EXAMPLES / "E05.vtt"])
    job = ingest(settings, redis, db, episodes, kind="ingest")
    queue = batch_queue(settings, redis)
    assert queue.count == job.batches
    raw = redis.hget(f"rq:job:{queue.job_ids[0]}", "data")
    assert json.loads(zlib.decompress(raw))[0] == "worker.tasks.embed_batch"


def test_unknown_job_id(settings: Settings, redis: Redis, db: Database) -> None:
    with pytest.raises(JobNotFoundError):
        JobRecords(redis, db, settings.result_ttl).status("no-such-job")


def test_cli_ingest_work_status(settings: Settings, redis: Redis, db: Database, tmp_path) -> None:
    bad = tmp_path / "broken.vtt"
    bad.write_text("WEBVTT\n\n00:00:01.000 --> 00:0x:02.000\n[Amit Varma]: hello\n")
    ingested = _cli(settings, "ingest", str(EXAMPLES / "E05.vtt"), str(bad), "--json")
    assert ingested.returncode == 1
    assert "broken.vtt: line 3: malformed timestamp" in ingested.stderr
    summary = json.loads(ingested.stdout)
    assert summary["episodes"] == 1 and summary["chunks"] > 0 and len(summary["refused"]) == 1

    worked = _cli(settings, "work", "--burst")
    assert worked.returncode == 0, worked.stderr
    shown = _cli(settings, "status", summary["job_id"], "--json")
    assert shown.returncode == 0
    status = json.loads(shown.stdout)
    assert status["state"] == "finished"
    assert status["chunks"]["embedded"] + status["chunks"]["skipped"] == summary["chunks"]


def test_cli_status_unknown_job_exits_2(settings: Settings, redis: Redis, db: Database) -> None:
    shown = _cli(settings, "status", "deadbeef0000", "--json")
    assert shown.returncode == 2
    assert shown.stdout == ""
    assert "no job with id 'deadbeef0000'" in shown.stderr


def test_status_does_not_import_torch(settings: Settings, redis: Redis, db: Database) -> None:
    code = ("import sys; from worker.cli import main; main(['status', 'x']) if False else None; "
            "import worker.cli, producer.jobs, producer.enqueue; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_job_index_keeps_only_jobs_redis_still_holds(settings: Settings, redis: Redis, db: Database) -> None:
    settings = settings.replace(result_ttl=1)
    episodes, _ = parse_files([EXAMPLES / "E05.vtt"])
    old = ingest(settings, redis, db, episodes, kind="ingest")
    time.sleep(2.1)  # created_at has whole seconds
    new = ingest(settings, redis, db, episodes, kind="ingest")
    assert [j.decode() for j in redis.zrange(JOBS_INDEX, 0, -1)] == [new.job_id]
    # Only the index forgets it: the older job is still found by its id.
    assert JobRecords(redis, db, settings.result_ttl).status(old.job_id).job_id == old.job_id


def test_a_workers_status_copies_remember_only_recent_jobs(settings: Settings, redis: Redis, db: Database) -> None:
    """A long-lived worker notes when it last copied each running job's status; notes past the copy
    interval decide nothing and are dropped at the next copy."""
    first, second = (ingest(settings, redis, db, parse_files([EXAMPLES / name])[0], kind="ingest").job_id
                     for name in ("E01.vtt", "E05.vtt"))
    ctx = init_context(settings, redis)
    ctx.keep_status(first, ended=False)
    assert set(ctx.status_saved) == {first}
    ctx.status_saved[first] -= STATUS_SAVE_SECONDS  # as if copied one interval ago
    ctx.keep_status(second, ended=False)
    assert set(ctx.status_saved) == {second}
    ctx.keep_status(second, ended=True)
    assert ctx.status_saved == {}
