"""What a catalog keeps in MongoDB: the claim check in `chunks` is consumed once a batch's vectors are stored."""

from __future__ import annotations

import statistics
from dataclasses import replace

import bson
import pytest
from pymongo.database import Database
from redis import Redis

from config.errors import PayloadError
from config.settings import Settings
from producer.chunkstore import ChunkStore
from producer.enqueue import ingest, parse_files, vector_spec
from producer.jobs import JobRecords
from producer.operations import retry
from tests.conftest import EXAMPLES
from worker.loop import run_worker
from worker.storage import bytes_per_embedded_chunk, collection_bytes
from worker.tasks import init_context

SHOW = "The Seen and the Unseen"


def _enqueue(settings: Settings, redis: Redis, db: Database) -> str:
    episodes, _ = parse_files([EXAMPLES / "E05.vtt"], podcast=SHOW)
    return ingest(settings, redis, db, episodes, kind="ingest").job_id


def test_a_finished_job_leaves_each_text_once_in_embeddings(settings: Settings, redis: Redis, db: Database) -> None:
    job_id = _enqueue(settings, redis, db)
    queued = {d["_id"]: d for d in db.chunks.find({})}
    assert queued and all(d["written_at"] is not None for d in queued.values())
    run_worker(settings.replace(batch_max_chunks=4), burst=True, redis=redis)

    assert JobRecords(redis, db, settings.result_ttl).status(job_id).state == "finished"
    assert db.chunks.count_documents({}) == 0
    stored = {d["chunk_id"]: d for d in db.embeddings.find({})}
    assert stored.keys() == queued.keys()
    assert all((d["text"], d["n_tokens"]) == (queued[i]["text"], queued[i]["n_tokens"]) for i, d in stored.items())


def test_a_batch_run_again_reads_its_texts_from_its_vectors(settings: Settings, redis: Redis, db: Database) -> None:
    _enqueue(settings, redis, db)
    ids = sorted(d["_id"] for d in db.chunks.find({}, {"_id": 1}))
    before = ChunkStore(db).load(ids)
    run_worker(settings, burst=True, redis=redis)
    assert db.chunks.count_documents({}) == 0
    # What RQ runs again when a batch failed after storing its vectors: the same ids, the same chunks.
    assert ChunkStore(db).load(ids, vector_spec(settings)) == before
    with pytest.raises(PayloadError, match="texts of .* are gone"):
        ChunkStore(db).load(ids, replace(vector_spec(settings), instruction="another instruction"))


def test_a_text_written_again_is_not_consumed_by_the_older_batch(settings: Settings, redis: Redis,
                                                                  db: Database) -> None:
    _enqueue(settings, redis, db)
    store = ChunkStore(db)
    first = store.load(sorted(d["_id"] for d in db.chunks.find({}, {"_id": 1})))
    changed = replace(first[0], text=first[0].text + " (corrected)")
    store.write([changed])
    # The older batch embedded the old text: the corrected one waits for its own batch.
    assert store.consume(first) == len(first) - 1
    assert store.load([changed.chunk_id]) == [changed]


def test_texts_gone_past_retention_fail_the_batch_with_the_reason(settings: Settings, redis: Redis,
                                                                   db: Database) -> None:
    job_id = _enqueue(settings, redis, db)
    db.chunks.delete_many({})  # what the TTL index does to texts older than PODEMBED_CHUNK_RETENTION
    run_worker(settings, burst=True, redis=redis)
    status = JobRecords(redis, db, settings.result_ttl).status(job_id)
    assert status.state == "failed" and status.chunks.embedded == 0
    (reason,) = set(status.errors.values())
    assert "are gone" in reason and "ingest their episodes again" in reason

    # A retry runs the batch again and says the same; ingesting again embeds the episode.
    assert retry(settings, redis, db, job_id).requeued
    run_worker(settings, burst=True, redis=redis)
    assert "are gone" in set(JobRecords(redis, db, settings.result_ttl).status(job_id).errors.values()).pop()
    again = _enqueue(settings, redis, db)
    run_worker(settings, burst=True, redis=redis)
    assert JobRecords(redis, db, settings.result_ttl).status(again).state == "finished"
    assert db.chunks.count_documents({}) == 0


def test_workers_keep_a_retention_index_on_chunks(settings: Settings, redis: Redis, db: Database) -> None:
    init_context(settings.replace(chunk_retention=3600), redis)
    (ttl,) = [i for i in db.chunks.list_indexes() if "expireAfterSeconds" in i]
    assert dict(ttl["key"]) == {"written_at": 1} and ttl["expireAfterSeconds"] == 3600


def test_mongo_keeps_three_quarters_of_the_two_copies_per_chunk(settings: Settings, redis: Redis,
                                                                db: Database) -> None:
    _enqueue(settings, redis, db)
    queued = [len(bson.encode(d)) for d in db.chunks.find({})]
    run_worker(settings, burst=True, redis=redis)
    vectors = [len(bson.encode(d)) for d in db.embeddings.find({})]
    assert len(vectors) == len(queued) > 0 and db.chunks.count_documents({}) == 0
    # In BSON (what MongoDB and Atlas store; nx-27017's collStats sizes are its own encoding): before, every
    # embedded chunk kept its claim-check document besides its vector document.
    assert statistics.mean(vectors) <= 0.75 * (statistics.mean(queued) + statistics.mean(vectors))
    measured = collection_bytes(db, "embeddings")
    assert measured.index_bytes is None  # nx-27017 reports no per-collection index sizes
    assert bytes_per_embedded_chunk(db) == measured.data_bytes / measured.documents
