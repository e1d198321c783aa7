"""The server time of one /metrics scrape, over growing numbers of stored vectors and a 10,000-entry ledger.

Private services on spare ports. The ledger gets `--ledger` entries spread over the last 7 days (some within
the histograms' 15-minute window), MongoDB `jobs` 1 job per 50 entries (ended) plus a few live ones in Redis,
the queues a few hundred batches and the running totals their counts. Then, for each `--vectors` size,
`embeddings` is filled up to it (small vectors: the scrape never reads them, which is the point) and the
collector is timed in process (`generate_latest`, the whole of the route's work): one JSON document with the
median and max of `--scrapes` scrapes at each size, and of three reads of the dashboard's 24 h chart.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bson.binary import Binary, BinaryVectorDtype  # noqa: E402
from prometheus_client import generate_latest  # noqa: E402

from config.services import on_spare_ports, services_down, services_up  # noqa: E402
from config.settings import Settings  # noqa: E402
from producer.connections import mongo_database, redis_client  # noqa: E402
from producer.enqueue import batch_queues  # noqa: E402
from producer.fleet import ledger_series  # noqa: E402
from producer.jobs import TOTALS_KEY, JobRecords, NewJob  # noqa: E402
from producer.web.metrics import metrics_registry  # noqa: E402

INSERT_BATCH = 2000


def fill_ledger(db, n: int, now: datetime) -> None:  # noqa: ANN001
    entries = [{"_id": f"bench{i // 50:06d}-{i % 50:05d}", "job_id": f"bench{i // 50:06d}", "n_chunks": 128,
                "n_tokens": 30_000, "gpu_seconds": 1.5 + i % 7, "wall_seconds": 2.0 + i % 9, "device": "cpu",
                "model": "bench", "worker": "bench", "cost_usd": 0.00002,
                "started_at": now - timedelta(seconds=i * 60 + 5), "finished_at": now - timedelta(seconds=i * 60)}
               for i in range(n)]
    for start in range(0, n, INSERT_BATCH):
        db.batches.insert_many(entries[start:start + INSERT_BATCH])
    db.jobs.insert_many([{"_id": f"bench{j:06d}", "state": "finished"} for j in range((n + 49) // 50)])


def fill_vectors(db, upto: int) -> None:  # noqa: ANN001
    have = db.embeddings.estimated_document_count()
    vector = Binary.from_vector([0.5] * 8, BinaryVectorDtype.FLOAT32)
    for start in range(have, upto, INSERT_BATCH):
        db.embeddings.insert_many([{"_id": f"c{i}|bench", "chunk_id": f"c{i}", "vector_key": "bench",
                                    "embedding": vector, "text": "x" * 200}
                                   for i in range(start, min(upto, start + INSERT_BATCH))])


def fill_redis(settings: Settings, redis, db) -> None:  # noqa: ANN001
    records = JobRecords(redis, db, settings.result_ttl)
    for i in range(5):  # live jobs: read from Redis at each scrape
        records.create(NewJob(job_id=f"live{i:08d}", kind="ingest", queue=settings.queue_name, model="bench",
                              instruction="", vector_key="bench"))
    for queue in batch_queues(settings, redis):
        with redis.pipeline() as pipe:
            for i in range(200):
                queue.enqueue_call("worker.tasks.embed_batch", args=({"n": i},), job_id=f"{queue.name}-{i:05d}",
                                   pipeline=pipe)
            pipe.execute()
    for field in ("batches", "embedded", "tokens", "gpu_seconds", "cost_usd"):
        redis.hset(TOTALS_KEY, f"{field}\tcpu\tbench", 1000)


def timed(work, n: int) -> dict:  # noqa: ANN001
    work()  # the first scrape creates the indexes
    seconds = []
    for _ in range(n):
        began = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - began)
    return {"median_ms": round(statistics.median(seconds) * 1000, 1), "max_ms": round(max(seconds) * 1000, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vectors", type=int, nargs="+", default=[0, 100_000],
                        help="stored vector counts to scrape at, in increasing order")
    parser.add_argument("--ledger", type=int, default=10_000, help="ledger entries")
    parser.add_argument("--scrapes", type=int, default=20, help="scrapes timed at each size")
    args = parser.parse_args()
    # Stopped (`timeout`, Ctrl-C): the services it started are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory() as tmp:
        settings = on_spare_ports(Settings.from_env(), Path(tmp)).replace(mongo_db="metrics_bench")
        services_up(settings)
        try:
            redis, db = redis_client(settings), mongo_database(settings)
            now = datetime.now(UTC)
            fill_ledger(db, args.ledger, now)
            fill_redis(settings, redis, db)
            registry = metrics_registry(settings, JobRecords(redis, db, settings.result_ttl))
            runs = []
            for size in args.vectors:
                began = time.perf_counter()
                fill_vectors(db, size)
                runs.append({"vectors": db.embeddings.estimated_document_count(),
                             "fill_seconds": round(time.perf_counter() - began, 1),
                             "scrape": timed(lambda: generate_latest(registry), args.scrapes),
                             # The dashboard's chart (GET /fleet/ledger): 1,440 entries in its 24 h here.
                             "ledger_24h": timed(lambda: ledger_series(db, datetime.now(UTC)), 3)})
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)  # a long fill's progress
            print(json.dumps({"ledger_entries": db.batches.estimated_document_count(),
                              "jobs": db.jobs.estimated_document_count(), "queued_batches": 600,
                              "scrapes_per_size": args.scrapes, "runs": runs}, indent=2))
        finally:
            services_down(settings)


if __name__ == "__main__":
    main()
