"""Retrieval quality of podembed search on real episodes, and the exact scan's speed (one JSON document).

Section titles of the vendored seenunseen episodes are the queries; a chunk is relevant to a
title when it belongs to the same episode and overlaps the section (the title's time up to the
next title's). The episodes are ingested and embedded by the real pipeline (Redis, worker,
nx-27017) under the chunk settings given, and every title is searched over every chunk of the
episodes with `podembed search`'s own `Searcher`. BM25 over the same chunks is the lexical anchor;
`hybrid` is `podembed search --hybrid`: the dense and BM25 rankings fused by reciprocal rank.

`dtypes` scores the same titles (dense, exact engine) over the same vectors stored as float32,
int8 and binary (packed bits; Hamming ranking alone, and rescored against the float query), each
form written from the float32 vectors as a worker stores it, with the scan's queries/s over those
chunks and the bytes the search cache holds.

Then `--scale` vectors are written straight into MongoDB under the same vector key (random unit
vectors, with the texts of every vendored episode's chunks, cycled), and the titles are searched
again with the cache and the BM25 index warm (built first, and timed apart, as a first hybrid
query builds it): queries per second of `--queries` mode, vectors only and hybrid, in the same run;
the milliseconds of one title a request (`GET /search` of the API on uvicorn); and one refresh
with nothing written, with the writers' change token and without one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
from pymongo.database import Database

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from config.services import on_spare_ports, services_down, services_up  # noqa: E402
from config.settings import Settings  # noqa: E402
from producer.connections import mongo_database, redis_client  # noqa: E402
from producer.enqueue import ingest, parse_files, stream_files, vector_spec  # noqa: E402
from producer.streaming import chunk_stream  # noqa: E402
from tests.bench.corpus import seenunseen_titles, seenunseen_vtt  # noqa: E402
from tests.test_api import TOKEN, _serving  # noqa: E402
from worker.loop import run_worker  # noqa: E402
from worker.read.lexical import FUSION_DEPTH, fuse  # noqa: E402
from worker.read.search import Searcher, query_instruction  # noqa: E402
from worker.store import CHANGES, VectorStore, from_bson_vector, to_bson_vector  # noqa: E402

# Tuned on the first episodes; the reported figure is on the last ones, never looked at while tuning.
TUNE_EPISODES = "E01-E30"
REPORT_EPISODES = "E91-E120"
DEPTH = 10  # ranks scored (recall@10)
SPEED_ROUNDS = 3  # end-to-end runs of each search mode over --scale vectors
ONE_QUERY_CALLS = 50  # HTTP requests of one query each, per mode (the median is reported)


def episode_range(text: str) -> list[str]:
    first, last = (int(part.strip().lstrip("E")) for part in text.split("-"))
    return [f"E{n:02d}" for n in range(first, last + 1)]


def seconds(clock: str) -> float:
    hours, minutes, rest = clock.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(rest)


def labelled_queries(episodes: list[str]) -> list[tuple[str, str, float, float]]:
    """(title, episode, section start, section end) for every title of the episodes."""
    out = []
    for episode in episodes:
        titles = json.loads((seenunseen_titles() / f"{episode}_titles.json").read_text())
        starts = [seconds(t["time"]) for t in titles]
        for n, title in enumerate(titles):
            end = starts[n + 1] if n + 1 < len(titles) else math.inf
            if title["title"].strip():  # a few machine-written titles are empty: no query
                out.append((title["title"], episode, starts[n], end))
    return out


def metrics(ranked: list[list[int]], relevant: list[set[int]]) -> dict:
    first = [next((r for r, item in enumerate(ranks) if item in rel), None) for ranks, rel in zip(ranked, relevant,
                                                                                                   strict=True)]
    n = len(first)
    return {f"recall@{k}": round(sum(1 for r in first if r is not None and r < k) / n, 4) for k in (1, 5, 10)} | {
        "mrr": round(sum(1 / (r + 1) for r in first if r is not None) / n, 4)}


def evaluate(settings: Settings, episodes: list[str], query_instructions: list[str]) -> dict:
    """Ingest and embed the episodes, then score dense, BM25 and hybrid rankings of their titles."""
    redis, db = redis_client(settings), mongo_database(settings)
    redis.flushdb()
    db.client.drop_database(db.name)
    files = {p.stem: p for p in seenunseen_vtt()}
    parsed, refused = parse_files([files[e] for e in episodes], podcast="The Seen and the Unseen")
    assert not refused, refused
    began = time.perf_counter()
    ingest(settings, redis, db, parsed, kind="ingest")
    run_worker(settings, burst=True, redis=redis)
    embed_seconds = time.perf_counter() - began
    chunks = list(db.embeddings.find({"vector_key": vector_spec(settings).key},
                                     {"chunk_id": 1, "episode_id": 1, "start": 1, "end": 1, "text": 1}))
    row = {c["chunk_id"]: n for n, c in enumerate(chunks)}
    row_of_id = {c["_id"]: n for n, c in enumerate(chunks)}
    queries = labelled_queries(episodes)
    relevant = [{n for n, c in enumerate(chunks) if c["episode_id"] == ep and c["start"] < end and c["end"] > start}
                for _, ep, start, end in queries]
    titles = [q[0] for q in queries]
    out: dict = {"chunks": len(chunks), "queries": len(queries),
                 "relevant_chunks_per_query": round(sum(map(len, relevant)) / len(relevant), 2),
                 "embed_seconds": round(embed_seconds, 1)}
    for instruction in query_instructions:
        searcher = Searcher(settings.replace(query_instruction=instruction), db)
        searcher.engine.refresh()
        if "bm25" not in out:
            lexical = searcher.engine.lexical(titles, DEPTH, None, None)
            out["bm25"] = metrics([[row_of_id[i] for i in ids] for ids in lexical], relevant)
        out[f"search (query instruction {instruction!r})"] = {
            mode: metrics([[row[h.chunk_id] for h in hits] for hits in searcher.search(titles, DEPTH, hybrid=hybrid)],
                          relevant)
            for mode, hybrid in (("dense", False), ("hybrid", True))}
    out["dtypes"] = dtypes(settings, titles, relevant, row)
    return out


def dtypes(settings: Settings, titles: list[str], relevant: list[set[int]], row: dict[str, int]) -> dict:
    """Recall, MRR, scan speed and cache bytes of each stored form of the float32 vectors."""
    db = mongo_database(settings)
    full = vector_spec(settings)
    docs = list(db.embeddings.find({"vector_key": full.key}))
    out: dict = {}
    for name, dtype, rescore in (("float32", "float32", None), ("int8", "int8", None), ("binary", "binary", 0),
                                 ("binary_rescored", "binary", None)):
        stored = settings.replace(vector_dtype=dtype)
        spec = vector_spec(stored)
        if spec.key != full.key and not db.embeddings.find_one({"vector_key": spec.key}, {"_id": 1}):
            db.embeddings.insert_many([d | {"_id": spec.embedding_id(d["chunk_id"]), "vector_key": spec.key,
                                            "embedding": to_bson_vector(from_bson_vector(d["embedding"]), dtype)}
                                       for d in docs])
        searcher = Searcher(stored, db)
        engine = searcher.engine
        engine.refresh()
        if rescore is not None:
            engine.rescore = rescore
        vectors = searcher.encode(titles)
        began = time.perf_counter()
        found = engine.search(vectors, DEPTH, None, None)
        scan = time.perf_counter() - began
        ranked = [[row[doc_id.partition("|")[0]] for doc_id, _ in hits] for hits in found]
        figures = metrics(ranked, relevant)
        out[name] = {"recall_at_1": figures["recall@1"], "recall_at_5": figures["recall@5"],
                     "recall_at_10": figures["recall@10"], "mrr": figures["mrr"],
                     "scan_queries_per_s": round(len(titles) / scan, 1),
                     "cache_bytes": int(engine.cache.vectors.nbytes)}
    return out


def scan_speed(settings: Settings, titles: list[str], scale: int) -> dict:
    """Queries per second over `scale` stored vectors (synthetic, unit length) with the cache warm."""
    db = mongo_database(settings)
    key = vector_spec(settings).key
    # Real chunks' fields, and the texts of the vendored episodes' chunks (all 120 give about 6,600), cycled, so
    # BM25 meets a catalog's vocabulary (at 100k rows a word held by one chunk is held by about 15 rows, not by
    # every 61st row as with the embedded episodes' chunks alone); random unit vectors.
    templates = list(db.embeddings.find({"vector_key": key}, {"_id": 0, "embedding": 0}))
    rng = np.random.default_rng(0)
    stored = db.embeddings.count_documents({"vector_key": key})  # not the other dtypes' copies
    texts: list[str] = []
    refused: list[str] = []
    episodes = stream_files(seenunseen_vtt(), refused, podcast="The Seen and the Unseen")
    for chunked in chunk_stream(settings, episodes, vector_spec(settings)):  # as many episodes as the rows need
        texts += [chunk.text for chunk in chunked.chunks]
        if len(texts) >= scale - stored:
            break
    assert not refused, refused
    stored_at = datetime.now(UTC) - timedelta(days=1)
    began = time.perf_counter()
    for start in range(0, scale - stored, 2000):
        vectors = rng.standard_normal((min(2000, scale - stored - start), 384)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        # Stored a day ago: a warm cache's refresh finds nothing new (with the templates' own times, every
        # refresh would read them again, as recent writes within PODEMBED_SEARCH_REFRESH_OVERLAP_S).
        db.embeddings.insert_many([templates[(start + i) % len(templates)] | {"_id": f"synthetic:{start + i}|{key}",
                                               "chunk_id": f"synthetic:{start + i}", "embedding": to_bson_vector(v),
                                               "text": texts[(start + i) % len(texts)], "embedded_at": stored_at}
                                   for i, v in enumerate(vectors)])
    VectorStore(db).mark_changed({key})  # as a worker's write does
    insert_seconds = time.perf_counter() - began
    searcher = Searcher(settings, db)
    began = time.perf_counter()
    searcher.engine.refresh()
    cold_seconds = time.perf_counter() - began
    began = time.perf_counter()
    searcher.engine.lexical(titles[:1], 10, None, None)  # the first hybrid query builds the BM25 index
    build_seconds = time.perf_counter() - began
    began = time.perf_counter()
    warm = Searcher(settings, db)  # a new process: the cache and the BM25 index come from their files
    warm.engine.refresh()
    file_seconds = time.perf_counter() - began
    began = time.perf_counter()
    warm.engine.lexical(titles[:1], 10, None, None)
    index_file_seconds = time.perf_counter() - began
    searcher.search(titles[:8], 10, hybrid=False)  # the model is loaded and warm
    out = {"vectors": len(searcher.engine.cache), "distinct_texts": len(set(searcher.engine.cache.texts)),
           "queries": len(titles), "engine": searcher.engine.name,
           "insert_seconds": round(insert_seconds, 1), "cache_from_mongo_seconds": round(cold_seconds, 2),
           "cache_from_file_seconds": round(file_seconds, 2), "bm25_index_build_seconds": round(build_seconds, 2),
           "bm25_index_from_file_seconds": round(index_file_seconds, 2)}
    # The two modes alternate, SPEED_ROUNDS times each: the median of each, so that a burst of load on a shared
    # machine moves one round, not one mode.
    rates: dict[str, list[float]] = {"vector": [], "hybrid": []}
    for _ in range(SPEED_ROUNDS):
        for mode, hybrid in (("vector", False), ("hybrid", True)):
            began = time.perf_counter()
            results = searcher.search(titles, 10, hybrid=hybrid)  # the whole of `--queries` but printing
            rates[mode].append(len(titles) / (time.perf_counter() - began))
            out[f"{mode}_hits_per_query"] = min(len(h) for h in results)
    for mode, figures in rates.items():
        out[f"{mode}_queries_per_second"] = round(statistics.median(figures), 1)
        out[f"{mode}_queries_per_second_rounds"] = [round(f, 1) for f in figures]
    out["hybrid_to_vector_ratio"] = round(out["hybrid_queries_per_second"] / out["vector_queries_per_second"], 3)
    vectors = searcher.encode(titles)
    began = time.perf_counter()
    searcher.engine.search(vectors, 10, None, None)
    out["scan_only_queries_per_second"] = round(len(titles) / (time.perf_counter() - began), 1)
    out["hybrid_milliseconds_per_query"] = hybrid_stages(searcher, titles)
    out["refresh_milliseconds"] = refresh_milliseconds(searcher, db, key)
    out["http_one_query_milliseconds"] = http_one_query(settings, titles, db, key)
    return out


def http_one_query(settings: Settings, titles: list[str], db: Database, key: str) -> dict[str, float]:
    """Median milliseconds of `GET /search` of one title from the API (`podembed serve`'s app, on uvicorn in a
    thread of this process, so it shares the loaded model) on these services and this data folder, vectors only
    and hybrid; every request refreshes the cache first, as every search call does. Then vectors only without the
    writers' change token, as when other software wrote the vectors."""
    out = {}
    try:
        with _serving(settings.replace(api_token=TOKEN)) as url, httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=600) as client:
            client.get("/search", params={"q": titles[0]}).raise_for_status()  # the cache and the index, loaded
            for mode in ("vector", "hybrid", "vector_without_token"):
                if mode == "vector_without_token":
                    db[CHANGES].delete_one({"_id": key})
                laps = []
                for title in titles[:ONE_QUERY_CALLS]:
                    began = time.perf_counter()
                    client.get("/search", params={"q": title, "hybrid": mode == "hybrid"}).raise_for_status()
                    laps.append(time.perf_counter() - began)
                out[mode] = round(statistics.median(laps) * 1000, 1)
    finally:
        VectorStore(db).mark_changed({key})
    return out


def refresh_milliseconds(searcher: Searcher, db: Database, key: str) -> dict[str, float]:
    """One refresh of the warm cache with nothing written since: with the writers' change token, and without one
    (vectors written by other software, or before podembed kept tokens), when it reads the recent documents."""
    engine, out = searcher.engine, {}

    def timed() -> float:
        began = time.perf_counter()
        engine.refresh()
        return round((time.perf_counter() - began) * 1000, 1)

    out["with_token"] = timed()
    db[CHANGES].delete_one({"_id": key})
    engine.refresh()  # the token's going is a change: this one reads and saves the cache
    out["without_token"] = timed()
    VectorStore(db).mark_changed({key})
    engine.refresh()
    return out


def hybrid_stages(searcher: Searcher, titles: list[str]) -> dict[str, float]:
    """Where a hybrid search of the titles spends its time, stage by stage, in milliseconds a query."""
    engine, clock, out = searcher.engine, time.perf_counter(), {}

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        out[stage] = round((now - clock) * 1000 / len(titles), 3)
        clock = now

    engine.refresh()
    lap("refresh")  # once a call, shared by its queries: the change token and the count (nothing was written)
    vectors = searcher.encode(titles)
    lap("embed")
    dense = engine.search(vectors, FUSION_DEPTH, None, None)
    lap("vector_scan")
    lexical = engine.lexical(titles, FUSION_DEPTH, None, None)
    lap("bm25")
    fused = [fuse([[doc_id for doc_id, _ in d], words], 10) for d, words in zip(dense, lexical, strict=True)]
    lap("fusion")
    engine.chunks(list({doc_id for hits in fused for doc_id, _ in hits}))
    lap("hit_fields")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", default=REPORT_EPISODES, help=f"e.g. {TUNE_EPISODES} (tuning) or "
                                                                    f"{REPORT_EPISODES} (reported, default)")
    parser.add_argument("--chunk-tokens", type=int, help="default: PODEMBED_CHUNK_TOKENS")
    parser.add_argument("--overlap-tokens", type=int, help="default: PODEMBED_CHUNK_OVERLAP_TOKENS")
    parser.add_argument("--query-instructions", nargs="+", help="query instructions to compare "
                                                                 "(default: the configured one)")
    parser.add_argument("--scale", type=int, default=100_000, help="stored vectors for the speed run (0: none)")
    parser.add_argument("--scan-queries", type=int, default=1000, help="titles searched in the speed run "
                                                                         "(default 1000)")
    args = parser.parse_args()

    overrides = {k: v for k, v in (("chunk_tokens", args.chunk_tokens),
                                   ("chunk_overlap_tokens", args.overlap_tokens)) if v is not None}
    episodes = episode_range(args.episodes)
    with tempfile.TemporaryDirectory() as tmp:
        settings = on_spare_ports(Settings.from_env(retry_intervals=(), **overrides), Path(tmp))
        settings = settings.replace(mongo_db="eval")
        services_up(settings)
        try:
            instructions = args.query_instructions or [query_instruction(settings)]
            report = {
                "episodes": args.episodes, "tuned_on": TUNE_EPISODES, "model": settings.model,
                "chunk_tokens": settings.chunk_tokens, "chunk_overlap_tokens": settings.chunk_overlap_tokens,
                "document_instruction": settings.instruction,
                **evaluate(settings, episodes, instructions),
            }
            if args.scale:
                titles = [q[0] for q in labelled_queries(episode_range("E01-E120"))][:args.scan_queries]
                report["exact_scan"] = scan_speed(settings, titles, args.scale)
        finally:
            services_down(settings)
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
