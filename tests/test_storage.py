"""What a catalog keeps in MongoDB: the claim check in `chunks` is consumed once a batch's vectors are stored."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace

import bson
import numpy as np
import pytest
from pymongo.database import Database
from redis import Redis

from config.errors import PayloadError, SearchError
from config.settings import Settings
from producer.chunkstore import ChunkStore
from producer.enqueue import ingest, parse_files, vector_spec
from producer.jobs import JobRecords
from producer.operations import retry
from tests.conftest import EXAMPLES, run_cli
from worker.loop import run_worker
from worker.read.search import Searcher, atlas_pipeline, index_definition
from worker.storage import bytes_per_embedded_chunk, collection_bytes
from worker.store import from_bson_vector
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


@pytest.mark.parametrize("dtype", ["int8", "binary"])
def test_quantized_vectors_are_stored_under_their_own_key_and_scanned_as_stored(
        dtype: str, settings: Settings, redis: Redis, db: Database) -> None:
    quantized = settings.replace(vector_dtype=dtype, search_hybrid=False)
    episodes, _ = parse_files([EXAMPLES / "E01.vtt", EXAMPLES / "E05.vtt"], podcast=SHOW)
    for each in (settings, quantized):
        ingest(each, redis, db, episodes, kind="ingest")
        run_worker(each, burst=True, redis=redis)
    full, small = vector_spec(settings), vector_spec(quantized)
    assert full.key != small.key and full == replace(small, dtype="float32")
    floats = {d["chunk_id"]: d for d in db.embeddings.find({"vector_key": full.key})}
    stored = {d["chunk_id"]: d for d in db.embeddings.find({"vector_key": small.key})}
    assert stored.keys() == floats.keys()
    # BSON vectors of the dtype (int8: 0x03, packed bits: 0x10), a quarter or a 32nd of the float32 bytes.
    assert {bytes(d["embedding"])[0] for d in stored.values()} == {0x03 if dtype == "int8" else 0x10}
    width = {"int8": 384, "binary": 48}[dtype]
    assert {len(bytes(d["embedding"])) for d in stored.values()} == {2 + width}

    searcher = Searcher(quantized, db)
    queries = searcher.encode(["why farmers cannot sell their land", "the history of the Indian constitution",
                               "what economists get wrong about cities"])
    cache = searcher.engine.cache
    searcher.engine.refresh()
    assert cache.vectors.dtype == (np.int8 if dtype == "int8" else np.uint8) and cache.vectors.shape[1] == width
    ids = list(cache.ids)
    # The cosine of each stored form with the query, by brute force over the float32 form `from_bson_vector` gives.
    matrix = np.stack([from_bson_vector(stored[i.partition("|")[0]]["embedding"]) for i in ids])
    cosines = (queries @ matrix.T) / (np.linalg.norm(queries, axis=1)[:, None] * np.linalg.norm(matrix, axis=1))
    found = searcher.engine.search(queries, 5, None, None)
    for hits, row in zip(found, cosines, strict=True):
        assert [s for _, s in hits] == pytest.approx([row[ids.index(i)] for i, _ in hits], abs=1e-5)
        # int8 scans exactly; binary rescores its Hamming candidates, which hold the exact best here.
        assert [i for i, _ in hits] == [ids[j] for j in np.argsort(-row, kind="stable")[:5]]
    if dtype == "binary":
        searcher.engine.rescore = 0  # the Hamming ranking alone: scores 1 - 2 x distance / dimensions
        signs = np.sign(queries)
        for hits, query in zip(searcher.engine.search(queries, 5, None, None), signs, strict=True):
            assert [s for _, s in hits] == pytest.approx(
                [float(query @ np.sign(matrix[ids.index(i)])) / 384 for i, _ in hits], abs=1e-5)


# Atlas Vector Search's documented `vectorSearch` index syntax ("How to Index Fields for Vector Search"):
# every field, its type, and the values it may take.
VECTOR_FIELD = {"type": {"vector"}, "path": str, "numDimensions": range(1, 8193),
                "similarity": {"euclidean", "cosine", "dotProduct"}, "quantization": {"none", "scalar", "binary"}}
FILTER_FIELD = {"type": {"filter"}, "path": str}


def _valid_atlas_index(doc: dict) -> None:
    assert set(doc) == {"name", "type", "definition"} and doc["type"] == "vectorSearch"
    assert set(doc["definition"]) == {"fields"}
    for field in doc["definition"]["fields"]:
        schema = VECTOR_FIELD if field["type"] == "vector" else FILTER_FIELD
        assert set(field) <= set(schema) and {"type", "path"} <= set(field)
        for name, value in field.items():
            allowed = schema[name]
            assert isinstance(value, allowed) if isinstance(allowed, type) else value in allowed, (name, value)
    vectors = [f for f in doc["definition"]["fields"] if f["type"] == "vector"]
    assert len(vectors) == 1 and {"numDimensions", "similarity"} <= set(vectors[0])


def test_index_print_quantization_is_a_valid_atlas_definition(settings: Settings, redis: Redis,
                                                              db: Database) -> None:
    _enqueue(settings, redis, db)
    run_worker(settings, burst=True, redis=redis)
    for quantization in ("none", "scalar", "binary"):
        out = run_cli(settings, "index", "--print", "--quantization", quantization)
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        _valid_atlas_index(doc)
        vector = doc["definition"]["fields"][0]
        assert (vector["numDimensions"], vector["similarity"]) == (384, "dotProduct")
        assert vector.get("quantization", "none") == quantization
    wrong = run_cli(settings, "index", "--print", "--quantization", "int4")
    assert wrong.returncode == 2 and "invalid choice: 'int4'" in wrong.stderr
    # numCandidates grows with how coarse the index is.
    query = np.ones(384, dtype=np.float32)
    candidates = [atlas_pipeline("i", query, 10, "key", None, None, quantization=q)[0]["$vectorSearch"]
                  ["numCandidates"] for q in ("none", "scalar", "binary")]
    assert candidates == sorted(candidates) and candidates[0] < candidates[-1] <= 10_000


def test_index_of_quantized_storage(settings: Settings, redis: Redis, db: Database) -> None:
    binary = settings.replace(vector_dtype="binary")
    episodes, _ = parse_files([EXAMPLES / "E05.vtt"], podcast=SHOW)
    ingest(binary, redis, db, episodes, kind="ingest")
    run_worker(binary, burst=True, redis=redis)
    doc = index_definition(binary, db, vector_spec(binary))
    _valid_atlas_index(doc)
    # int1 vectors: dimensions in bits, euclidean (the one similarity Atlas takes for them), no quantization.
    assert doc["definition"]["fields"][0] == {"type": "vector", "path": "embedding", "numDimensions": 384,
                                              "similarity": "euclidean"}
    with pytest.raises(SearchError, match="stored as binary already"):
        index_definition(binary, db, vector_spec(binary), "scalar")


def test_storage_measures_per_chunk_and_projects(settings: Settings, redis: Redis, db: Database) -> None:
    _enqueue(settings, redis, db)
    run_worker(settings, burst=True, redis=redis)
    out = run_cli(settings, "storage", "--json", "--chunks", "14,000,000", "--chunks", "1000")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    vectors = collection_bytes(db, "embeddings")
    per = doc["bytes_per_embedded_chunk"]
    assert (doc["dtype"], doc["dimensions"], doc["embedded_chunks"]) == ("float32", 384, vectors.documents)
    assert per["embeddings_data"] == vectors.data_bytes / vectors.documents and per["chunks_data"] == 0
    # nx-27017 has no per-collection index sizes: the database's stand in, and the output says so.
    assert "embeddings_indexes" not in per and per["database_indexes"] > 0 and doc["notes"]
    assert per["total"] == pytest.approx(sum(v for k, v in per.items() if k != "total"))
    # Atlas's sizing: 4 bytes a dimension in float32, about 1/3.75 of it scalar-quantized, 1/24 binary.
    assert doc["index_ram_bytes_per_vector"] == pytest.approx({"none": 1536, "scalar": 1536 / 3.75,
                                                               "binary": 64})
    big, small = doc["projections"]
    assert (big["chunks"], small["chunks"]) == (14_000_000, 1000)
    assert big["disk_gb"] == pytest.approx(per["total"] * 14e6 / 1e9)
    assert big["index_ram_gb_none"] == pytest.approx(1536 * 14e6 / 1e9)

    wide = json.loads(run_cli(settings, "storage", "--json", "--dims", "768").stdout)
    grown = wide["bytes_per_embedded_chunk"]["embeddings_data"] - per["embeddings_data"]
    assert grown == pytest.approx(384 * 4) and wide["index_ram_bytes_per_vector"]["none"] == 3072
    bad = run_cli(settings, "storage", "--chunks", "0")
    assert bad.returncode == 2 and "'0' is not a positive whole number" in bad.stderr
    human = run_cli(settings, "storage")
    assert human.returncode == 0 and "14,000,000 chunks:" in human.stdout


def test_storage_without_vectors_says_so(settings: Settings, db: Database) -> None:
    out = run_cli(settings, "storage")
    assert out.returncode != 0 and "no vectors stored under vector key" in out.stderr
    assert out.stderr.count("\n") == 1
