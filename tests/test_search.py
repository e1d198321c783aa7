"""Search over vectors stored by the real pipeline: exact scan vs brute force, the cache, index, HTTP."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from subprocess import CompletedProcess

import httpx
import numpy as np
import pytest
from pymongo.database import Database
from redis import Redis

from config.settings import Settings
from producer.enqueue import ingest, parse_files, vector_spec
from tests.bench.corpus import seenunseen_titles
from tests.conftest import EXAMPLES, cli_env, run_cli
from tests.test_api import api_settings as api_settings  # noqa: F401 (fixture)
from tests.test_api import base_url, client  # noqa: F401 (fixtures)
from tests.test_lexical import bm25_scores
from worker.loop import run_worker
from worker.read.lexical import LexicalIndex
from worker.read.search import INSTRUCTOR_QUERY_INSTRUCTION, ExactScan, Searcher, index_definition, query_instruction
from worker.read.vector_cache import VectorCache, drop_cached
from worker.store import VectorStore, from_bson_vector, to_bson_vector

PODCAST = "The Seen and the Unseen"


def _titles(episode: str, n: int) -> list[str]:
    """Section titles of a real episode: natural queries about its content."""
    return [t["title"] for t in json.loads((seenunseen_titles() / f"{episode}_titles.json").read_text())[:n]]


def _brute_force(db: Database, key: str, query: np.ndarray, k: int, episode_id: str | None = None
                 ) -> list[tuple[str, float]]:
    """Cosine over every stored vector of the key, read straight from MongoDB."""
    query_filter = {"vector_key": key} | ({"episode_id": episode_id} if episode_id else {})
    docs = list(db.embeddings.find(query_filter, {"chunk_id": 1, "embedding": 1}))
    matrix = np.stack([from_bson_vector(d["embedding"]) for d in docs])
    scores = matrix @ query / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(query))
    order = np.argsort(-scores)[:k]
    return [(docs[i]["chunk_id"], float(scores[i])) for i in order]


@pytest.fixture
def stored(settings: Settings, redis: Redis, db: Database) -> Settings:
    """E01 and E05 of the examples ingested and embedded by a real worker."""
    episodes, refused = parse_files([EXAMPLES / "E01.vtt", EXAMPLES / "E05.vtt"], podcast=PODCAST)
    assert refused == []
    ingest(settings, redis, db, episodes, kind="ingest")
    run_worker(settings, burst=True, redis=redis)
    return settings


def test_search_and_queries_match_brute_force_cosine(
    stored: Settings, db: Database, tmp_path: Path, cli_in_process: Callable[..., CompletedProcess]
) -> None:
    queries = _titles("E01", 4) + _titles("E05", 4)
    searcher = Searcher(stored, db)
    # The local default fuses with BM25 (see the hybrid test); the vector ranking alone is checked here.
    assert (searcher.engine.name, searcher.hybrid) == ("exact", True)
    assert Searcher(stored.replace(search_hybrid=False), db).hybrid is False
    key = vector_spec(stored).key
    expected = [_brute_force(db, key, vector, 5) for vector in searcher.encode(queries)]
    assert len({chunk for hits in expected for chunk, _ in hits}) > 10  # the queries find different chunks

    results = searcher.search(queries, 5, hybrid=False)
    for hits, want in zip(results, expected, strict=True):
        assert [h.chunk_id for h in hits] == [c for c, _ in want]
        assert [h.score for h in hits] == pytest.approx([s for _, s in want], abs=1e-5)
        assert all(h.podcast == PODCAST and h.text and h.end >= h.start for h in hits)

    one = run_cli(stored, "search", f"  {queries[0]}\t", "-k", "5", "--no-hybrid", "--json")
    assert (one.returncode, one.stderr) == (0, "")  # no "Loading weights" bar either
    doc = json.loads(one.stdout)
    assert (doc["engine"], doc["hybrid"], doc["vector_key"], doc["k"]) == ("exact", False, key, 5)
    assert [h["chunk_id"] for h in doc["hits"]] == [c for c, _ in expected[0]]

    lines = tmp_path / "queries.txt"
    lines.write_text("\n".join(queries) + "\n\n")
    many = cli_in_process(cli_env(stored), "search", "--queries", str(lines), "-k", "5", "--no-hybrid")
    assert many.returncode == 0, many.stderr
    answers = [json.loads(line) for line in many.stdout.splitlines()]
    assert [a["query"] for a in answers] == queries
    for answer, want in zip(answers, expected, strict=True):
        assert [h["chunk_id"] for h in answer["hits"]] == [c for c, _ in want]
        assert set(answer["hits"][0]) == {"chunk_id", "episode_id", "podcast", "start", "end", "score", "text"}

    episode = searcher.search(queries[:1], 3, episode_id="E05", hybrid=False)[0]
    assert [h.chunk_id for h in episode] == [c for c, _ in _brute_force(db, key, searcher.encode(queries[:1])[0],
                                                                         3, episode_id="E05")]
    assert searcher.search(queries[:1], 3, podcast="Another show") == [[]]


def _bm25_brute_force(db: Database, key: str, query: str) -> list[str]:
    """Okapi BM25 (k1=1.5, b=0.75) of every stored chunk, document by document: chunk ids, best first."""
    docs = list(db.embeddings.find({"vector_key": key}, {"chunk_id": 1, "text": 1}))
    scores = bm25_scores([d["text"] for d in docs], query)
    return [docs[i]["chunk_id"] for i in sorted(range(len(docs)), key=lambda i: -scores[i]) if scores[i] > 0][:100]


def test_hybrid_is_the_rank_fusion_of_brute_force_cosine_and_bm25(
    stored: Settings, db: Database, cli_in_process: Callable[..., CompletedProcess]
) -> None:
    queries = _titles("E01", 2) + _titles("E05", 2)
    searcher = Searcher(stored, db)
    key = vector_spec(stored).key
    results = searcher.search(queries, 5, hybrid=True)
    for query, vector, hits in zip(queries, searcher.encode(queries), results, strict=True):
        fused: dict[str, float] = {}
        for ranking in ([c for c, _ in _brute_force(db, key, vector, 100)], _bm25_brute_force(db, key, query)):
            for rank, chunk in enumerate(ranking):
                fused[chunk] = fused.get(chunk, 0.0) + 1 / (60 + rank + 1)
        assert [h.score for h in hits] == pytest.approx(sorted(fused.values(), reverse=True)[:5], abs=1e-6)
        assert all(h.score == pytest.approx(fused[h.chunk_id], abs=1e-6) for h in hits)

    scoped = searcher.search(queries[:1], 8, episode_id="E05", hybrid=True)[0]
    assert len(scoped) == 8 and {h.episode_id for h in scoped} == {"E05"}

    out = cli_in_process(cli_env(stored), "search", queries[0], "-k", "5", "--json")  # hybrid: the local default
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert (doc["engine"], doc["hybrid"]) == ("exact", True)
    assert [h["chunk_id"] for h in doc["hits"]] == [h.chunk_id for h in results[0]]


def test_search_refuses_bad_input_in_one_line(
    stored: Settings, tmp_path: Path, cli_in_process: Callable[..., CompletedProcess]
) -> None:
    # The first in a process of its own, as a person runs it; the others in this one, on the model it holds.
    for n, (args, message) in enumerate([
                          (("search",), 'podembed: no query: give one (podembed search "what to find"), or '
                                        "--queries FILE\n"),
                          (("search", "   "), "podembed: empty query (query 1 of 1)\n"),
                          (("search", "farming", "-k", "0"), "podembed: k must be between 1 and 1000, got 0\n"),
                          (("search", "x", "--queries", str(tmp_path / "q.txt")),
                           "podembed: give one query, or --queries FILE, not both\n"),
                          (("search", "x", "--podcast", PODCAST.lower()), f"podembed: no podcast {PODCAST.lower()!r} "
                                                                          f"among the stored vectors (closest: "
                                                                          f"{PODCAST!r})\n"),
                          (("search", "x", "--podcast", PODCAST, "--episode", "E5"), f"podembed: no episode 'E5' of "
                           f"podcast {PODCAST!r} among the stored vectors (closest: 'E05')\n"),
                          (("search", "x", "--instruction", "Represent nothing:"), None)]):
        out = run_cli(stored, *args) if n == 0 else cli_in_process(cli_env(stored), *args)
        assert out.returncode == 1, out.stdout
        if message:
            assert out.stderr == message
        else:
            assert out.stderr.startswith("podembed: no vectors stored under vector key ")
            assert out.stderr.count("\n") == 1


def test_query_instruction_defaults() -> None:
    assert query_instruction(Settings()) == ""
    assert query_instruction(Settings(model="hkunlp/instructor-xl")) == INSTRUCTOR_QUERY_INSTRUCTION
    assert query_instruction(Settings(query_instruction="Represent the question:")) == "Represent the question:"


def test_index_print_matches_the_stored_vectors(stored: Settings, db: Database) -> None:
    out = run_cli(stored, "index", "--print")
    assert out.returncode == 0, out.stderr
    definition = json.loads(out.stdout)
    stored_dims = {len(from_bson_vector(d["embedding"])) for d in db.embeddings.find({}, {"embedding": 1})}
    assert stored_dims == {384}
    assert definition == {"name": "podembed_vectors", "type": "vectorSearch", "definition": {"fields": [
        {"type": "vector", "path": "embedding", "numDimensions": 384, "similarity": "dotProduct"},
        {"type": "filter", "path": "vector_key"}, {"type": "filter", "path": "podcast"},
        {"type": "filter", "path": "episode_id"}]}}

    # nx-27017 accepts a search index definition but cannot run $vectorSearch: say so, create nothing.
    create = run_cli(stored, "index")
    assert create.returncode == 1
    assert create.stderr.startswith("podembed: this server has no Atlas Vector Search (")
    assert create.stderr.count("\n") == 1


def test_index_definition_uses_cosine_for_vectors_that_are_not_unit(settings: Settings, db: Database) -> None:
    raw = settings.replace(normalize=False)
    spec = vector_spec(raw)
    rng = np.random.default_rng(3)
    db.embeddings.insert_many([{"_id": f"c{i}|{spec.key}", "vector_key": spec.key,
                                "embedding": to_bson_vector(rng.standard_normal(48) * 3)} for i in range(5)])
    fields = index_definition(raw, db, spec)["definition"]["fields"]
    assert fields[0] == {"type": "vector", "path": "embedding", "numDimensions": 48, "similarity": "cosine"}


def _put(db: Database, key: str, ids: range, vectors: np.ndarray, at: datetime, texts: list[str] | None = None
         ) -> None:
    for n, i in enumerate(ids):
        db.embeddings.update_one({"_id": f"c{i}"}, {"$set": {
            "vector_key": key, "chunk_id": f"c{i}", "episode_id": f"E{i % 3}", "podcast": PODCAST,
            "start": 10.0 * i, "end": 10.0 * i + 12, "embedding": to_bson_vector(vectors[i]),
            "embedded_at": at + timedelta(seconds=i)}
            | ({"text": texts[n]} if texts else {})}, upsert=True)


def test_cache_follows_re_embedding_and_deletion(settings: Settings, db: Database) -> None:
    settings = settings.replace(search_refresh_overlap_s=0)
    rng = np.random.default_rng(7)
    old = rng.standard_normal((40, 16)).astype(np.float32)
    t0 = datetime.now(UTC) - timedelta(hours=1)
    _put(db, "k", range(40), old, t0)
    _put(db, "other", range(40, 45), rng.standard_normal((45, 16)).astype(np.float32), t0)
    scan = ExactScan(settings, db, "k")
    scan.refresh()
    assert scan.search(old[7:8], 1, None, None)[0][0] == ("c7", pytest.approx(1.0))
    assert len(scan.cache) == 40

    # Re-embedded: same _id, new vector, newer embedded_at. A new process starts from the file on disk.
    new = rng.standard_normal((40, 16)).astype(np.float32)
    _put(db, "k", range(7, 8), new, datetime.now(UTC) - timedelta(seconds=7))  # embedded after the refresh
    warm = ExactScan(settings, db, "k")
    assert len(warm.cache) == 40
    stats = warm.cache.refresh(db.embeddings)
    assert (stats.read, stats.rebuilt) == (1, False)  # only what changed since the last refresh
    assert warm.search(new[7:8], 1, None, None)[0][0] == ("c7", pytest.approx(1.0))
    cosine = float(old[7] @ new[7] / np.linalg.norm(old[7]) / np.linalg.norm(new[7]))
    assert dict(warm.search(old[7:8], 40, None, None)[0])["c7"] == pytest.approx(cosine, abs=1e-5)
    scan.refresh()
    assert scan.search(new[7:8], 1, None, None)[0][0] == ("c7", pytest.approx(1.0))

    # Deleted: the count for the key dropped below the cache's, so the cache is read again.
    db.embeddings.delete_one({"_id": "c3"})
    stats = warm.cache.refresh(db.embeddings)
    assert (stats.rebuilt, len(warm.cache)) == (True, 39)
    assert "c3" not in [c for c, _ in warm.search(old[3:4], 39, None, None)[0]]
    assert {c for c, _ in warm.search(old[:1], 39, None, "E1")[0]} == {f"c{i}" for i in range(1, 40, 3)}


def test_a_refresh_reads_nothing_while_the_change_token_and_the_count_stand(stored: Settings, db: Database) -> None:
    settings = stored.replace(search_refresh_overlap_s=3600)  # a read would take every chunk again
    key = vector_spec(settings).key
    scan = ExactScan(settings, db, key)
    assert scan.cache.refresh(db.embeddings).read == len(scan.cache) > 0
    assert scan.cache.refresh(db.embeddings).read == 0  # the worker's token and the count are as they were
    warm = ExactScan(settings, db, key)  # a new process: the token comes with the cache file
    assert warm.cache.refresh(db.embeddings).read == 0

    # A write of vectors (here re-embedding one chunk) replaces the token: the next refresh reads.
    doc = db.embeddings.find_one({"vector_key": key})
    vector = np.random.default_rng(11).standard_normal(len(from_bson_vector(doc["embedding"]))).astype(np.float32)
    VectorStore(db).upsert([doc | {"embedding": to_bson_vector(vector), "embedded_at": datetime.now(UTC)}])
    stats = warm.cache.refresh(db.embeddings)
    assert stats.read > 0 and not stats.rebuilt
    assert warm.search(vector[None], 1, None, None)[0][0] == (doc["_id"], pytest.approx(1.0))

    # A deletion leaves the token as it is: the count tells.
    db.embeddings.delete_one({"_id": doc["_id"]})
    assert warm.cache.refresh(db.embeddings).rebuilt
    assert doc["_id"] not in warm.cache.ids


def test_the_exact_engine_answers_hits_from_its_cache(settings: Settings, db: Database, caplog) -> None:
    vectors = np.random.default_rng(5).standard_normal((6, 16)).astype(np.float32)
    _put(db, "k", range(6), vectors, datetime.now(UTC) - timedelta(hours=1), [f"text {i}" for i in range(6)])
    scan = ExactScan(settings, db, "k")
    scan.refresh()
    four = {"chunk_id": "c4", "episode_id": "E1", "podcast": PODCAST, "start": 40.0, "end": 52.0, "text": "text 4"}
    assert scan.chunks(["c4", "c9"]) == {"c4": four}
    assert ExactScan(settings, db, "k").chunks(["c4"]) == {"c4": four}  # a new process: from the cache file

    # A file written before the cache kept the chunks' times is read again from MongoDB, without a warning.
    path = scan.cache.path
    with np.load(path) as data:
        older = {name: data[name] for name in data.files if name not in ("chunk_ids", "starts", "ends")}
    np.savez(path, **older)
    with caplog.at_level(logging.INFO, logger="worker.read.vector_cache"):
        again = ExactScan(settings, db, "k")
    assert len(again.cache) == 0 and "before it kept chunk times" in caplog.text and "unreadable" not in caplog.text
    again.refresh()
    assert again.chunks(["c4"]) == {"c4": four}


def test_the_bm25_index_is_saved_beside_the_cache_and_follows_its_rows(settings: Settings, db: Database) -> None:
    settings = settings.replace(search_refresh_overlap_s=3600)  # every refresh reads every chunk again
    texts = [line.partition("]: ")[2] for line in (EXAMPLES / "E01.vtt").read_text().splitlines() if "]: " in line]
    rng = np.random.default_rng(11)
    vectors = rng.standard_normal((30, 16)).astype(np.float32)
    _put(db, "k", range(30), vectors, datetime.now(UTC) - timedelta(minutes=5), texts)
    scan = ExactScan(settings, db, "k")
    scan.refresh()
    path = scan.cache.lexical_path
    assert (path.parent, path.suffix) == (scan.cache.path.parent, ".bm25") and not path.exists()
    first = scan.lexical(["farmer in a village"], 5, None, None)
    assert first[0][0] == f"c{int(np.argmax(bm25_scores(texts[:30], 'farmer in a village')))}"
    assert path.stat().st_mode & 0o777 == 0o600 and LexicalIndex.load(path, scan.cache.version) is not None

    # A new process loads it; chunks read again unchanged are no change, so it is neither built nor written again.
    built = path.stat().st_mtime_ns
    warm = ExactScan(settings, db, "k")
    warm.refresh()
    assert warm.cache.version == scan.cache.version
    assert warm.lexical(["farmer in a village"], 5, None, None) == first and path.stat().st_mtime_ns == built

    # A chunk's new text is a new version of the rows: the index is built again from them.
    _put(db, "k", range(3, 4), vectors, datetime.now(UTC), ["a zeppelin drifting over the hut"])
    warm.refresh()
    assert warm.cache.version != scan.cache.version
    assert warm.lexical(["zeppelin"], 5, None, None) == [["c3"]]
    assert LexicalIndex.load(path, warm.cache.version) is not None

    # Deleting a podcast's rows from the cache deletes the index that holds their words.
    assert drop_cached(warm.cache.path, PODCAST, None) == 30 and not path.exists()


def test_a_damaged_cache_file_is_rebuilt_with_a_warning(settings: Settings, db: Database, caplog) -> None:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((30, 16)).astype(np.float32)
    _put(db, "k", range(30), vectors, datetime.now(UTC) - timedelta(hours=1))
    scan = ExactScan(settings, db, "k")
    scan.refresh()
    path = scan.cache.path
    whole = path.read_bytes()
    # Cut short (a full disk, a killed writer), or not a zip at all: each costs one full read, no failed search.
    for damaged in (whole[: len(whole) // 2], whole[:100], b"not a cache"):
        path.write_bytes(damaged)
        with caplog.at_level("WARNING"):
            again = ExactScan(settings, db, "k")
        assert "ignoring unreadable vector cache" in caplog.text and len(again.cache) == 0
        caplog.clear()
        again.refresh()
        assert again.search(vectors[4:5], 1, None, None)[0][0] == ("c4", pytest.approx(1.0))
        assert len(again.cache) == 30 and path.read_bytes() != damaged


def test_cache_writers_use_their_own_private_temporary_files(settings: Settings, db: Database, tmp_path: Path) -> None:
    settings = settings.replace(data_dir=tmp_path / "data")  # the planted link stays out of the services' folder
    rng = np.random.default_rng(5)
    _put(db, "k", range(20), rng.standard_normal((20, 16)).astype(np.float32), datetime.now(UTC))
    scan = ExactScan(settings, db, "k")
    path = scan.cache.path
    path.parent.mkdir(parents=True, exist_ok=True)
    # A link planted where a writer used to put its temporary file is never written through.
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    path.with_suffix(".partial.npz").symlink_to(victim)
    scan.refresh()
    assert victim.read_text() == "keep me" and path.stat().st_mode & 0o777 == 0o600
    # Writers at once (two processes refreshing one cache) never share a temporary file.
    caches = [VectorCache(path, "k", timedelta(0)) for _ in range(4)]
    for cache in caches:
        cache.refresh(db.embeddings)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda cache: [cache.save() for _ in range(10)], caches))
    assert len(VectorCache(path, "k", timedelta(0))) == 20
    # No temporary file is left behind (the planted link is all there is).
    assert [p.name for p in path.parent.iterdir() if "partial" in p.name] == [path.with_suffix(".partial.npz").name]


def test_http_search_behind_the_token(
    client: httpx.Client, base_url: str, api_settings: Settings, redis: Redis, db: Database,  # noqa: F811
    cli_in_process: Callable[..., CompletedProcess],
) -> None:
    episodes, _ = parse_files([EXAMPLES / "E05.vtt"], podcast=PODCAST)
    ingest(api_settings, redis, db, episodes, kind="ingest")
    run_worker(api_settings, burst=True, redis=redis)
    query = _titles("E05", 1)[0]
    response = client.get("/search", params={"q": query, "k": 3, "hybrid": "false"})
    assert response.status_code == 200, response.text
    doc = response.json()
    expected = Searcher(api_settings, db).search([query], 3, hybrid=False)[0]
    assert (doc["query"], doc["engine"], doc["vector_key"]) == (query, "exact", vector_spec(api_settings).key)
    assert [h["chunk_id"] for h in doc["hits"]] == [h.chunk_id for h in expected]
    assert doc["hybrid"] is False
    # What `podembed search --json` prints: the same fields, `k` too, and the same hits.
    shown = cli_in_process(cli_env(api_settings), "search", query, "-k", "3", "--no-hybrid", "--json")
    assert shown.returncode == 0, shown.stderr
    cli = json.loads(shown.stdout)
    assert list(doc) == list(cli) and doc["k"] == cli["k"] == 3
    assert [h["chunk_id"] for h in doc["hits"]] == [h["chunk_id"] for h in cli["hits"]]
    fused = client.get("/search", params={"q": query, "k": 3}).json()
    assert fused["hybrid"] is True
    assert [h["chunk_id"] for h in fused["hits"]] == [h.chunk_id for h in Searcher(api_settings, db).search(
        [query], 3, hybrid=True)[0]]

    assert httpx.get(f"{base_url}/search", params={"q": query}).status_code == 401
    assert client.get("/search", params={"q": ""}).status_code == 422
    assert client.get("/search", params={"q": query, "k": 0}).status_code == 422
    blank = client.get("/search", params={"q": "   "})
    assert (blank.status_code, blank.json()) == (422, {"detail": "empty query (query 1 of 1)"})
