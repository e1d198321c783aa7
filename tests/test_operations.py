"""Nightly, backfill (and its dry run), retry and cancel, on real Redis, nx-27017, the small model and
real transcripts; and the CLI commands over them, run as a user runs them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pymongo.database import Database
from redis import Redis
from rq.job import Job
from rq.registry import CanceledJobRegistry
from rq.serializers import JSONSerializer

from config.errors import QueueError
from config.settings import Settings
from producer.enqueue import batch_queue, enqueue_episodes, ingest, parse_files, vector_spec
from producer.jobs import JOBS_INDEX, JobRecords
from producer.models import episode_key
from producer.operations import backfill, cancel, nightly, retry
from producer.parsing import parse_file
from producer.sources import DirectorySource, EpisodeFilter, MongoSource
from producer.streaming import chunk_episodes
from producer.tokens import load_tokenizer
from tests.conftest import DATA, EXAMPLES, ROOT
from tests.conftest import run_cli as _cli
from tests.test_sources import SHOW, transcript_docs
from worker.loop import make_worker, run_worker


@pytest.fixture
def records(settings: Settings, redis: Redis, db: Database) -> JobRecords:
    return JobRecords(redis, db, settings.result_ttl)


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The bundled model under another name: a second model the worker can really load."""
    path = tmp_path_factory.mktemp("models") / "minilm-copy"
    path.symlink_to(Settings().model_source())
    return str(path)


def _source_dir(tmp_path: Path, *files: Path) -> Path:
    folder = tmp_path / "transcripts"
    folder.mkdir(exist_ok=True)
    for file in files:
        shutil.copy(file, folder / file.name)
    return folder


def _drain(settings: Settings, redis: Redis) -> None:
    run_worker(settings, burst=True, redis=redis)


def test_nightly_enqueues_only_new_or_changed_episodes(
    settings: Settings, redis: Redis, db: Database, records: JobRecords, tmp_path: Path
) -> None:
    folder = _source_dir(tmp_path, EXAMPLES / "E05.vtt", DATA / "E03.srt")
    first = nightly(settings, redis, db, DirectorySource(folder))
    assert first.job_id is not None
    assert (first.episodes, first.chunks, first.unchanged) == (2, 22, 0)
    # Nightly batches go to the nightly queue, none to the ingest queue.
    assert (batch_queue(settings, redis, "nightly").count, batch_queue(settings, redis).count) == (first.batches, 0)
    assert records.status(first.job_id).kind == "nightly"
    assert records.status(first.job_id).queue == settings.queue_for("nightly")

    second = nightly(settings, redis, db, DirectorySource(folder))
    assert (second.job_id, second.episodes, second.chunks, second.batches, second.unchanged) == (None, 0, 0, 0, 2)
    assert redis.zcard(JOBS_INDEX) == 1

    # A changed transcript and a new one: only those two.
    srt = folder / "E03.srt"
    srt.write_text(srt.read_text().replace("income tax department", "customs department", 1))
    shutil.copy(DATA / "E03.txt", folder / "E07.txt")
    third = nightly(settings, redis, db, DirectorySource(folder))
    assert (third.episodes, third.unchanged) == (2, 1)
    assert third.chunks == 11 + 4
    mark = db.watermarks.find_one({"_id": f"{DirectorySource(folder).key}|{vector_spec(settings).key}"})
    assert {key: content for key, content, _ in mark["episodes"]} == {
        parse_file(p).key: parse_file(p).content_sha256() for p in folder.iterdir()}
    assert {job_id for *_, job_id in mark["episodes"]} == {first.job_id, third.job_id}

    # Another instruction is another vector key: everything is new to it.
    other = nightly(settings.replace(instruction="Represent the episode for clustering:"), redis, db,
                    DirectorySource(folder))
    assert (other.episodes, other.unchanged) == (3, 0)


def test_nightly_watermark_stays_when_enqueue_fails(settings: Settings, redis: Redis, db: Database,
                                                    tmp_path: Path) -> None:
    folder = _source_dir(tmp_path, DATA / "E03.txt")
    queue_key = batch_queue(settings, redis, "nightly").key
    redis.set(queue_key, "not a list")  # the enqueue itself fails, after chunking
    with pytest.raises(QueueError, match="cannot enqueue job"):
        nightly(settings, redis, db, DirectorySource(folder))
    assert db.watermarks.count_documents({}) == 0

    redis.delete(queue_key)
    run = nightly(settings, redis, db, DirectorySource(folder))
    assert (run.episodes, run.chunks) == (1, 4)
    assert batch_queue(settings, redis, "nightly").count == run.batches == 1


def test_nightly_from_mongo_end_to_end(settings: Settings, redis: Redis, db: Database, records: JobRecords) -> None:
    db.transcripts.insert_many(transcript_docs())
    first = nightly(settings, redis, db, MongoSource(db))
    assert (first.episodes, first.chunks, first.source) == (3, 26, "mongo:transcripts")
    _drain(settings, redis)
    status = records.status(first.job_id)
    assert status.state == "finished" and status.chunks.embedded == 26
    assert db.embeddings.count_documents({}) == 26

    assert nightly(settings, redis, db, MongoSource(db)).job_id is None

    text = db.transcripts.find_one({"_id": "E03.notes"})["text"]
    db.transcripts.update_one({"_id": "E03.notes"}, {"$set": {"text": text + "\n\nA closing paragraph, added later."}})
    changed = nightly(settings, redis, db, MongoSource(db))
    assert (changed.episodes, changed.unchanged) == (1, 2)
    _drain(settings, redis)
    status = records.status(changed.job_id)
    assert status.state == "finished"
    # Only the chunk whose text changed is embedded again; the rest reuse their vectors.
    assert status.chunks.embedded == 1 and status.chunks.skipped == changed.chunks - 1
    assert db.embeddings.count_documents({}) == 26


def test_backfill_dry_run_estimates_and_enqueues_nothing(settings: Settings, redis: Redis, db: Database) -> None:
    db.transcripts.insert_many(transcript_docs())
    selection = EpisodeFilter(podcast=SHOW)
    dry = backfill(settings, redis, db, MongoSource(db), selection, dry_run=True)

    assert batch_queue(settings, redis, "backfill").count == 0 and redis.zcard(JOBS_INDEX) == 0
    assert (dry.job_id, dry.episodes, dry.chunks, dry.already_embedded) == (None, 2, 22, 0)
    spec = vector_spec(settings)
    episodes = [e for e in MongoSource(db).episodes() if selection.matches(e)]
    chunks = chunk_episodes(settings, episodes, spec)
    prompt = load_tokenizer(settings).count_with_specials(settings.instruction)
    tokens = sum(c.n_tokens + prompt for c in chunks)
    doc = dry.to_dict()
    assert doc["tokens"] == sum(c.n_tokens for c in chunks)
    assert doc["estimate_from"] == "default" and doc["device"] is None
    assert doc["tokens_per_second"] == settings.default_tokens_per_second
    assert doc["est_gpu_seconds"] == pytest.approx(tokens / settings.default_tokens_per_second, abs=1e-3)
    assert doc["est_cost_usd"] == pytest.approx(doc["est_gpu_seconds"] * settings.price_per_hour("A10G") / 3600,
                                                abs=1e-6)

    job = backfill(settings, redis, db, MongoSource(db), selection)
    assert (job.chunks, job.batches) == (22, dry.batches)
    _drain(settings, redis)
    ledger = list(db.batches.find({}))
    measured = sum(e["n_tokens"] for e in ledger) / sum(e["gpu_seconds"] for e in ledger)

    # Everything is embedded now: a plain dry run finds nothing; a forced one is priced from the ledger.
    assert backfill(settings, redis, db, MongoSource(db), selection, dry_run=True).chunks == 0
    forced = backfill(settings, redis, db, MongoSource(db), selection, force=True, dry_run=True).to_dict()
    assert forced["chunks"] == 22 and forced["estimate_from"] == "ledger" and forced["device"] == "cpu"
    assert forced["tokens_per_second"] == pytest.approx(measured, rel=1e-3)
    assert forced["est_gpu_seconds"] == pytest.approx(tokens / measured, rel=1e-3)
    assert batch_queue(settings, redis, "backfill").count == 0


def test_backfill_skips_embedded_chunks_unless_forced(
    settings: Settings, redis: Redis, db: Database, records: JobRecords
) -> None:
    db.transcripts.insert_many(transcript_docs())
    only_e05 = EpisodeFilter(episode_ids=frozenset({"E05"}))
    first = backfill(settings, redis, db, MongoSource(db), only_e05)
    assert (first.episodes, first.chunks) == (1, 11)
    assert records.status(first.job_id).kind == "backfill"
    _drain(settings, redis)
    before = {d["_id"]: d["job_id"] for d in db.embeddings.find({}, {"job_id": 1})}
    assert set(before.values()) == {first.job_id}

    # Nothing is queued, and the job says why: every chunk skipped, finished at once.
    again = backfill(settings, redis, db, MongoSource(db), only_e05)
    assert (again.chunks, again.batches, again.already_embedded) == (0, 0, 11)
    status = records.status(again.job_id)
    assert (status.state, status.chunks.total, status.chunks.skipped, status.batches.total) == ("finished", 11, 11, 0)
    assert status.enqueue_done and status.finished_at is not None
    assert batch_queue(settings, redis, "backfill").count == 0

    forced = backfill(settings, redis, db, MongoSource(db), only_e05, force=True)
    assert forced.chunks == 11
    _drain(settings, redis)
    status = records.status(forced.job_id)
    assert (status.state, status.chunks.embedded, status.chunks.skipped) == ("finished", 11, 0)
    # Overwritten in place: the same documents, each now written by the forced job.
    after = {d["_id"]: d["job_id"] for d in db.embeddings.find({}, {"job_id": 1})}
    assert after == dict.fromkeys(before, forced.job_id)


def test_backfill_other_model_writes_new_documents_only(
    settings: Settings, redis: Redis, db: Database, records: JobRecords, model_copy: str
) -> None:
    db.transcripts.insert_many(transcript_docs())
    only_e05 = EpisodeFilter(episode_ids=frozenset({"E05"}))
    backfill(settings, redis, db, MongoSource(db), only_e05)
    _drain(settings, redis)
    before = {d["_id"]: d for d in db.embeddings.find({})}

    run = backfill(settings, redis, db, MongoSource(db), only_e05, model=model_copy)
    assert (run.model, run.chunks, run.already_embedded) == (model_copy, 11, 0)
    # One model per worker: the other model's batches go to a worker started for it.
    _drain(settings.replace(model=model_copy, model_path=None), redis)
    assert records.status(run.job_id).state == "finished"

    new_spec = vector_spec(settings.replace(model=model_copy, model_path=None))
    docs = {d["_id"]: d for d in db.embeddings.find({})}
    assert len(docs) == 22
    e05 = episode_key(SHOW, "E05")
    assert {i for i in docs if i not in before} == {new_spec.embedding_id(f"{e05}:{n}") for n in range(11)}
    for doc_id, doc in before.items():  # the first model's vectors are untouched
        assert docs[doc_id]["embedding"] == doc["embedding"] and docs[doc_id]["embedded_at"] == doc["embedded_at"]
    assert {docs[i]["model"] for i in docs if i not in before} == {model_copy}
    # Same weights under another name: the vectors agree.
    assert docs[new_spec.embedding_id(f"{e05}:3")]["embedding"] == docs[
        vector_spec(settings).embedding_id(f"{e05}:3")]["embedding"]


def test_retry_requeues_failed_batches(settings: Settings, redis: Redis, db: Database, records: JobRecords,
                                       tmp_path: Path) -> None:
    # The job names a model no worker serves yet: every batch really fails, at once.
    late_model = tmp_path / "late-model"
    episodes, _ = parse_files([EXAMPLES / "E05.vtt"])
    spec = vector_spec(settings.replace(model=str(late_model), model_path=None))
    job = enqueue_episodes(settings.replace(batch_max_chunks=4), redis, db, episodes, kind="ingest", spec=spec)
    _drain(settings, redis)
    status = records.status(job.job_id)
    assert (status.state, status.chunks.failed, status.batches.failed) == ("failed", 11, 3)
    assert all(f"but this worker serves {settings.model!r}" in reason for reason in status.errors.values())
    assert batch_queue(settings, redis).failed_job_registry.count == 3

    first = retry(settings, redis, db, job.job_id)
    assert sorted(first.requeued) == records.batch_ids(job.job_id) and first.state == "queued"
    status = records.status(job.job_id)
    assert (status.chunks.failed, status.batches.queued, status.errors, status.finished_at) == (0, 3, {}, None)
    assert batch_queue(settings, redis).count == 3
    assert db.jobs.find_one({"_id": job.job_id})["state"] == "queued"
    second = retry(settings, redis, db, job.job_id)
    assert (second.requeued, batch_queue(settings, redis).count) == ([], 3)

    late_model.symlink_to(settings.model_source())  # the model arrives, and a worker for it
    _drain(settings.replace(model=str(late_model), model_path=None), redis)
    status = records.status(job.job_id)
    assert (status.state, status.chunks.embedded, status.chunks.failed) == ("finished", 11, 0)
    assert status.finished_at is not None


def test_cancel_removes_queued_batches_running_ones_finish(
    settings: Settings, redis: Redis, db: Database, records: JobRecords
) -> None:
    settings = settings.replace(batch_max_chunks=3)
    episodes, _ = parse_files([EXAMPLES / "E05.vtt"])
    job = ingest(settings, redis, db, episodes, kind="ingest")
    assert job.batches == 4
    worker, _ = make_worker(settings, redis)
    worker.work(burst=True, max_jobs=1)  # one batch done before the cancel

    result = cancel(settings, redis, db, job.job_id)
    batch_ids = records.batch_ids(job.job_id)
    assert sorted(result.removed) == batch_ids[1:] and result.state == "cancelled"
    assert batch_queue(settings, redis).count == 0
    assert sorted(CanceledJobRegistry(queue=batch_queue(settings, redis)).get_job_ids()) == batch_ids[1:]
    status = records.status(job.job_id)
    assert (status.state, status.batches.finished, status.chunks.embedded) == ("cancelled", 1, 3)
    assert status.finished_at is not None
    assert db.jobs.find_one({"_id": job.job_id})["state"] == "cancelled"

    again = cancel(settings, redis, db, job.job_id)
    assert (again.removed, again.state) == ([], "cancelled")
    _drain(settings, redis)
    assert db.embeddings.count_documents({}) == 3
    retried = retry(settings, redis, db, job.job_id)  # a cancelled job is never retried
    assert (retried.state, retried.requeued) == ("cancelled", [])


def test_cancel_and_retry_leave_a_finished_job_alone(
    settings: Settings, redis: Redis, db: Database, records: JobRecords
) -> None:
    episodes, _ = parse_files([DATA / "E03.txt"])
    job = ingest(settings, redis, db, episodes, kind="ingest")
    _drain(settings, redis)
    assert cancel(settings, redis, db, job.job_id).state == "finished"
    assert retry(settings, redis, db, job.job_id).requeued == []
    assert records.status(job.job_id).state == "finished"


def test_a_batch_deleted_with_rqs_api_fails_and_its_job_ends(settings: Settings, redis: Redis, db: Database,
                                                            records: JobRecords) -> None:
    episodes, _ = parse_files([EXAMPLES / "E05.vtt"], podcast=SHOW)
    job = ingest(settings.replace(batch_max_chunks=3), redis, db, episodes, kind="ingest")
    deleted = records.batch_ids(job.job_id)[1]
    Job.fetch(deleted, connection=redis, serializer=JSONSerializer).delete()  # rq-dashboard's Delete button
    run_worker(settings, burst=True, redis=redis)  # its housekeeper's first pass finds the batch gone
    status = records.status(job.job_id)
    c, b = status.chunks, status.batches
    assert (status.state, b.total, b.finished, b.failed, b.queued, b.running) == ("partial", 4, 3, 1, 0, 0)
    assert (c.total, c.embedded, c.failed, c.pending) == (11, 8, 3, 0)
    assert status.errors == {deleted: "deleted outside podembed"}
    assert db.jobs.find_one({"_id": job.job_id})["state"] == "partial"

    retried = _cli(settings, "retry", job.job_id)
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.splitlines() == [
        f"job {job.job_id}: 0 failed batches requeued; now partial",
        "1 failed batch deleted outside podembed cannot be requeued (their chunk ids went with them): run the "
        "same ingest, nightly or backfill again to embed what they held"]
    again = json.loads(_cli(settings, "retry", job.job_id, "--json").stdout)
    assert (again["requeued"], again["deleted"], again["state"]) == ([], [deleted], "partial")


def test_cancel_counts_a_deleted_batch_failed_at_once(settings: Settings, redis: Redis, db: Database,
                                                      records: JobRecords) -> None:
    episodes, _ = parse_files([EXAMPLES / "E05.vtt"], podcast=SHOW)
    job = ingest(settings.replace(batch_max_chunks=3), redis, db, episodes, kind="ingest")
    deleted = records.batch_ids(job.job_id)[0]
    Job.fetch(deleted, connection=redis, serializer=JSONSerializer).delete()
    cancelled = _cli(settings, "cancel", job.job_id)
    assert cancelled.stdout == f"job {job.job_id}: 3 queued batches removed; now cancelled\n", cancelled.stderr
    status = records.status(job.job_id)
    c, b = status.chunks, status.batches
    assert (b.total, b.cancelled, b.failed, b.queued) == (4, 3, 1, 0)
    assert (c.total, c.cancelled, c.failed, c.pending) == (11, 8, 3, 0)


def test_cli_nightly_twice(settings: Settings, redis: Redis, db: Database, tmp_path: Path) -> None:
    folder = _source_dir(tmp_path, DATA / "E03.txt")
    first = _cli(settings, "nightly", "--source", str(folder), "--json")
    assert first.returncode == 0, first.stderr
    doc = json.loads(first.stdout)
    assert doc["job_id"] and (doc["episodes"], doc["chunks"], doc["batches"]) == (1, 4, 1)

    second = _cli(settings, "nightly", "--source", str(folder), "--json")
    assert second.returncode == 0
    doc = json.loads(second.stdout)
    assert (doc["job_id"], doc["episodes"], doc["chunks"], doc["unchanged"]) == (None, 0, 0, 1)
    human = _cli(settings, "nightly", "--source", str(folder))
    assert human.stdout.startswith(f"nothing new in dir:{folder.resolve()} since the last run (1 episode unchanged)")


def test_cli_backfill_dry_run(settings: Settings, redis: Redis, db: Database) -> None:
    db.transcripts.insert_many(transcript_docs())
    shown = _cli(settings, "backfill", "--podcast", SHOW, "--since", "2016-11-01", "--dry-run", "--json")
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert (doc["job_id"], doc["episodes"], doc["chunks"], doc["dry_run"]) == (None, 1, 11, True)
    assert doc["estimate_from"] == "default" and doc["est_gpu_seconds"] > 0 and doc["est_cost_usd"] > 0
    assert batch_queue(settings, redis, "backfill").count == 0 and redis.zcard(JOBS_INDEX) == 0

    human = _cli(settings, "backfill", "--episodes", "E03", "E05", "--until", "2016-12-31", "--dry-run")
    assert "dry run, nothing enqueued: 2 episodes, 22 chunks" in human.stdout
    assert "the configured default: the ledger has no batch of this model" in human.stdout
    bad = _cli(settings, "backfill", "--since", "yesterday", "--dry-run")
    assert bad.returncode == 2 and "'yesterday' is not a day (YYYY-MM-DD)" in bad.stderr


def test_back_to_back_ingests_embed_each_text_once(settings: Settings, redis: Redis, db: Database,
                                                   records: JobRecords) -> None:
    # Three ingests of the same files before a worker runs: nothing is stored yet, so each queues every chunk,
    # and a worker's batch of the second is looked up while the first one's are still on the model.
    files = [str(EXAMPLES / "E01.vtt"), str(EXAMPLES / "E05.vtt")]
    jobs = []
    for _ in range(3):
        out = _cli(settings, "ingest", *files, "--podcast", SHOW, "--json")
        assert out.returncode == 0, out.stderr
        jobs.append(json.loads(out.stdout))
    assert [(j["skipped"], j["chunks"]) for j in jobs] == [(0, jobs[0]["chunks"])] * 3
    run_worker(settings, burst=True, redis=redis)
    # The ledger says what the model computed: every text once, all in the first job.
    ledger = [sum(e["n_embedded"] for e in db.batches.find({"job_id": j["job_id"]})) for j in jobs]
    assert ledger == [jobs[0]["chunks"], 0, 0]
    for job in jobs[1:]:
        status = records.status(job["job_id"])
        assert (status.state, status.chunks.embedded, status.chunks.skipped) == ("finished", 0, job["chunks"])
    assert db.embeddings.count_documents({}) == jobs[0]["chunks"]


def test_backfill_dry_run_counts_texts_stored_under_other_chunks(settings: Settings, redis: Redis, db: Database,
                                                                 records: JobRecords, tmp_path: Path) -> None:
    # Ingested under one podcast name, backfilled from a folder naming another: other chunks, the same texts.
    folder = tmp_path / "catalog" / "Another Name"
    folder.mkdir(parents=True)
    shutil.copy(EXAMPLES / "E05.vtt", folder)
    ingested = _cli(settings, "ingest", str(folder), "--podcast", SHOW, "--json")
    assert ingested.returncode == 0, ingested.stderr
    chunks = json.loads(ingested.stdout)["chunks"]
    run_worker(settings, burst=True, redis=redis)

    dry = _cli(settings, "backfill", "--source", str(tmp_path / "catalog"), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    doc = json.loads(dry.stdout)
    assert (doc["episodes"], doc["already_embedded"], doc["chunks"], doc["tokens"]) == (1, chunks, 0, 0)
    assert (doc["batches"], doc["est_gpu_seconds"]) == (1, 0)
    real = _cli(settings, "backfill", "--source", str(tmp_path / "catalog"), "--json")
    assert real.returncode == 0, real.stderr
    run_worker(settings, burst=True, redis=redis)
    status = records.status(json.loads(real.stdout)["job_id"])
    assert (status.state, status.chunks.embedded, status.chunks.skipped) == ("finished", 0, doc["already_embedded"])


def test_cli_jobs_cancel_retry_and_unknown_ids(settings: Settings, redis: Redis, db: Database) -> None:
    jobs = []
    for path in (DATA / "E03.txt", EXAMPLES / "E05.vtt"):
        jobs.append(ingest(settings, redis, db, parse_files([path])[0], kind="ingest").job_id)
        time.sleep(1.1)  # the job index orders by creation time in whole seconds
    listed = _cli(settings, "jobs", "--json")
    assert [j["job_id"] for j in json.loads(listed.stdout)] == jobs[::-1]
    table = _cli(settings, "jobs").stdout.splitlines()
    assert table[1].split()[:3] == [jobs[1], "ingest", "queued"] and "0/11" in table[1]

    cancelled = _cli(settings, "cancel", jobs[1], "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout) == {"job_id": jobs[1], "state": "cancelled",
                                            "removed": [f"{jobs[1]}-00000"]}
    assert _cli(settings, "cancel", jobs[1]).stdout.strip() == f"job {jobs[1]}: 0 queued batches removed; now cancelled"
    retried = _cli(settings, "retry", jobs[0], "--json")
    assert json.loads(retried.stdout) == {"job_id": jobs[0], "state": "queued", "requeued": [], "deleted": []}

    for command in (["retry", "0123456789ab"], ["cancel", "0123456789ab"], ["status", "0123456789ab", "--watch"]):
        out = _cli(settings, *command)
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.strip() == "podembed: no job with id '0123456789ab'"


def test_cli_status_watch_follows_the_job_to_its_end(settings: Settings, redis: Redis, db: Database) -> None:
    episodes, _ = parse_files([DATA / "E03.txt"])
    job = ingest(settings, redis, db, episodes, kind="ingest")
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PODEMBED_REDIS_URL": settings.redis_url,
           "PODEMBED_MONGO_URI": settings.mongo_uri, "PODEMBED_MONGO_DB": settings.mongo_db}
    watcher = subprocess.Popen([sys.executable, "-m", "worker.cli", "status", job.job_id, "--watch", "--json",
                                "--interval", "0.2"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        assert watcher.poll() is None  # still waiting on the queued job
        _drain(settings, redis)
        stdout, stderr = watcher.communicate(timeout=30)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, stderr
    assert json.loads(stdout)["state"] == "finished"
    # Text mode reads each `\r` redraw as a line of its own.
    lines = [line.removesuffix("\x1b[K") for line in stderr.splitlines() if line]
    assert lines[0].startswith("[" + "." * 30 + "] 0/4 chunks") and lines[0].endswith("queued")
    assert lines[-1].startswith("[" + "#" * 30 + "] 4/4 chunks") and lines[-1].endswith("finished")


def test_operator_commands_do_not_import_torch() -> None:
    code = ("import sys, worker.cli, producer.operations, producer.sources, producer.web.api, uvicorn; "
            "print('torch' in sys.modules, 'sentence_transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False False", out.stderr


def test_rq_info_shows_our_queue(settings: Settings, redis: Redis, db: Database) -> None:
    job = ingest(settings.replace(batch_max_chunks=4), redis, db, parse_files([EXAMPLES / "E05.vtt"])[0],
                 kind="ingest")
    rq = Path(sys.executable).parent / "rq"
    out = subprocess.run([str(rq), "info", "--url", settings.redis_url, "--serializer", "json", "--only-queues",
                          "--raw", settings.queue_name], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"queue {settings.queue_name} {job.batches}" in out.stdout
