"""`make scale`: a catalog-scale backfill through the CLI, streamed, claim-checked and resumed (one JSON document).

Builds a synthetic catalog from the 120 vendored seenunseen episodes: copies under new episode
ids in ten podcast folders, each cue of a copy marked with its copy number so that no chunk's
text repeats (dedupe hides no work). Starts its own Redis and nx-27017, then:

1. `podembed backfill --source CATALOG --json` with no worker running, sampled every 0.2 s:
   time to the first batch on the queue, the producer's resident memory (with its pool
   processes) at 10 % and 100 % of the catalog, Redis' used memory;
2. the same command again on fresh services, a worker (the bundled model cut to one layer)
   draining meanwhile, SIGKILLed halfway through the catalog and run again: the second run
   resumes. Every chunk must then be queued exactly once over both jobs (`resume_ok`), and
   vectors must have arrived while the producer was still reading.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bson  # noqa: E402
from pymongo.collection import Collection  # noqa: E402
from rq.job import Job  # noqa: E402
from rq.serializers import JSONSerializer  # noqa: E402

from config.services import on_spare_ports, services_down, services_up  # noqa: E402
from config.settings import Settings  # noqa: E402
from producer.connections import mongo_database, redis_client  # noqa: E402
from producer.enqueue import batch_queue, parse_files, vector_spec  # noqa: E402
from producer.jobs import JOBS_INDEX, JobRecords  # noqa: E402
from producer.streaming import chunk_episodes  # noqa: E402
from tests.bench.corpus import seenunseen_vtt  # noqa: E402
from tests.soak.harness import start_worker, wait_until, worker_env  # noqa: E402
from worker.storage import bytes_per_embedded_chunk  # noqa: E402

_TIMING = re.compile(r"-->")
PODCASTS = 10


def build_catalog(folder: Path, copies: int) -> int:
    """`copies` marked copies of every vendored episode under `folder`; the number of files."""
    count = 0
    for source in seenunseen_vtt():
        lines = source.read_text().splitlines()
        cue_text = [i for i, line in enumerate(lines) if _is_text(lines, i)]
        for copy in range(copies):
            marked = list(lines)
            for i in cue_text:
                marked[i] = f"{lines[i]} take{copy}"
            show = folder / f"Show {copy % PODCASTS}"
            show.mkdir(parents=True, exist_ok=True)
            (show / f"{source.stem}-{copy:04d}.vtt").write_text("\n".join(marked) + "\n")
            count += 1
    return count


def _is_text(lines: list[str], i: int) -> bool:
    # A cue's text: after its timing line, up to the blank line that ends the cue.
    j = i
    while j > 0 and lines[j - 1].strip():
        j -= 1
    return bool(lines[i].strip()) and i > j and any(_TIMING.search(lines[k]) for k in range(j, i))


@dataclass
class Samples:
    """What a sampling thread saw of one producer run."""

    first_batch_seconds: float | None = None
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (fraction of episodes enqueued, MB)
    redis_peak_bytes: int = 0
    redis_queued_bytes: int = 0  # once the whole catalog is queued


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants (the chunking pool), in MB."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
        todo += [int(c) for c in children]
    return total / 1024


def sample(process: subprocess.Popen, settings: Settings, episodes: int, began: float, out: Samples) -> None:
    redis = redis_client(settings)
    records = JobRecords(redis, mongo_database(settings), settings.result_ttl)
    queue = batch_queue(settings, redis, "backfill")
    while process.poll() is None:
        if out.first_batch_seconds is None and queue.count:
            out.first_batch_seconds = time.perf_counter() - began
        out.redis_peak_bytes = max(out.redis_peak_bytes, redis.info("memory")["used_memory"])
        job_ids = redis.zrange(JOBS_INDEX, -1, -1)
        done = records.status(job_ids[0].decode()).episodes if job_ids else 0
        out.rss_mb.append((done / episodes, tree_rss_mb(process.pid)))
        time.sleep(0.2)


def bson_bytes(collection: Collection, n: int = 1000) -> int:
    """Mean BSON size of `n` documents of the collection (what a MongoDB tier stores, before indexes)."""
    sizes = [len(bson.encode(doc)) for doc in collection.find({}).limit(n)]
    return round(sum(sizes) / len(sizes)) if sizes else 0


def fresh(settings: Settings) -> None:
    redis_client(settings).flushall()
    mongo_database(settings).client.drop_database(settings.mongo_db)


def backfill(env: dict[str, str], catalog: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "worker.cli", "backfill", "--source", str(catalog), "--json"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_layer_model(target: Path) -> Path:
    """The bundled model cut to its first transformer layer, saved where a worker process can load it."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(Settings().model_source(), device="cpu")
    bert = model[0].auto_model
    bert.encoder.layer = bert.encoder.layer[:1]
    bert.config.num_hidden_layers = 1
    model.save(str(target))
    return target


def run_measured(settings: Settings, env: dict[str, str], catalog: Path, episodes: int) -> tuple[dict, Samples, float]:
    """One backfill of the whole catalog, sampled; Redis' memory is counted from before it started."""
    used_before = redis_client(settings).info("memory")["used_memory"]
    samples = Samples()
    began = time.perf_counter()
    process = backfill(env, catalog)
    sampler = threading.Thread(target=sample, args=(process, settings, episodes, began, samples))
    sampler.start()
    out, err = process.communicate()
    seconds = time.perf_counter() - began
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"backfill failed: {err[-2000:]}")
    samples.redis_peak_bytes -= used_before
    samples.redis_queued_bytes = redis_client(settings).info("memory")["used_memory"] - used_before
    return json.loads(out), samples, seconds


def run_resumed(settings: Settings, env: dict[str, str], catalog: Path, episodes: int, chunks: int,
                work: Path) -> dict:
    """Kill the producer halfway (a worker draining meanwhile), run it again: each of the catalog's
    `chunks` must be queued exactly once over both jobs."""
    redis = redis_client(settings)
    db = mongo_database(settings)
    records = JobRecords(redis, db, settings.result_ttl)
    worker = start_worker({**env, "PODEMBED_MODEL_PATH": str(one_layer_model(work / "one-layer"))},
                          work / "worker.log")
    process = backfill(env, catalog)
    try:
        wait_until(lambda: redis.zcard(JOBS_INDEX) == 1 and records.status(
            redis.zrange(JOBS_INDEX, 0, 0)[0].decode()).episodes >= episodes // 2, timeout=3600,
            what="half the catalog enqueued")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    [first] = [j.decode() for j in redis.zrange(JOBS_INDEX, 0, -1)]
    vectors_while_producing = db.embeddings.count_documents({})
    again = backfill(env, catalog)
    out, err = again.communicate()
    vectors_before_end = db.embeddings.count_documents({})
    worker.stop()
    if again.returncode != 0:
        raise SystemExit(f"resumed backfill failed: {err[-2000:]}")
    second = json.loads(out)
    queued: Counter[str] = Counter()
    for job_id in (first, second["job_id"]):
        for batch in Job.fetch_many(records.batch_ids(job_id), connection=redis, serializer=JSONSerializer):
            queued.update(batch.args[0]["chunk_ids"])
    # A chunk whose batch stored its vector left `chunks` (the claim check is consumed).
    waiting = {d["_id"] for d in db.chunks.find({}, {"_id": 1})}
    embedded = {d["chunk_id"] for d in db.embeddings.find({}, {"chunk_id": 1})}
    stored = waiting | embedded
    return {
        "mongo_bytes_per_vector_doc": bson_bytes(db.embeddings),
        # From collStats: vector documents, their indexes where the server reports them, texts left behind.
        "mongo_bytes_per_embedded_chunk": round(bytes_per_embedded_chunk(db, len(waiting & embedded))),
        "resume_ok": len(queued) == len(stored) == chunks and set(queued) == stored and max(queued.values()) == 1
        and records.status(first).enqueue_done is False and records.status(second["job_id"]).enqueue_done,
        "resume_interrupted_job": first,
        "resume_first_run_episodes": records.status(first).episodes,
        "resume_second_run_episodes": second["episodes"],
        "resume_chunks_queued_twice": sum(n > 1 for n in queued.values()),
        "resume_chunks_never_queued": chunks - len(queued),
        "vectors_stored_while_first_producer_ran": vectors_while_producing,
        "vectors_stored_while_producers_ran": vectors_before_end,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-episodes", type=int, default=3000)
    parser.add_argument("--min-chunks", type=int, default=400_000)
    args = parser.parse_args()
    settings = Settings.from_env()
    originals = len(chunk_episodes(settings, parse_files(seenunseen_vtt())[0], vector_spec(settings)))
    copies = max(-(-args.min_episodes // len(seenunseen_vtt())), -(-args.min_chunks * 100 // (originals * 97)))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        episodes = build_catalog(work / "catalog", copies)
        settings = on_spare_ports(settings, work / "services")
        services_up(settings)
        try:
            env = worker_env(settings.redis_url, settings.mongo_uri, settings.mongo_db)
            job, samples, seconds = run_measured(settings, env, work / "catalog", episodes)
            # Median of the samples in a band: one sample catches a window's transient peak or trough.
            at_10 = statistics.median(mb for fraction, mb in samples.rss_mb if 0.1 <= fraction < 0.2)
            at_100 = statistics.median(mb for fraction, mb in samples.rss_mb if fraction >= 0.9)
            report = {
                "episodes": job["episodes"],
                "chunks": job["chunks"],
                "tokens": job["tokens"],
                "batches": job["batches"],
                "producer_seconds": round(seconds, 1),
                "first_batch_seconds": round(samples.first_batch_seconds or seconds, 2),
                "producer_tokens_per_s": round(job["tokens"] / seconds),
                "producer_peak_rss_mb": round(max(mb for _, mb in samples.rss_mb), 1),
                "producer_rss_mb_at_10pct": round(at_10, 1),  # median over 10-20 % of the catalog
                "producer_rss_mb_at_100pct": round(at_100, 1),  # median over 90-100 %
                "redis_peak_used_memory_mb": round(samples.redis_peak_bytes / 2**20, 2),
                "redis_bytes_per_queued_chunk": round(samples.redis_queued_bytes / job["chunks"], 1),
                "mongo_docs_per_s": round(job["chunks"] / seconds),
                "mongo_bytes_per_chunk_doc": bson_bytes(mongo_database(settings).chunks),
                "producer_processes": settings.producer_processes or os.cpu_count(),
                "enqueue_window_chunks": settings.enqueue_window_chunks,
            }
            fresh(settings)
            report.update(run_resumed(settings, env, work / "catalog", episodes, job["chunks"], work))
        finally:
            services_down(settings)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
