"""`make bench`: the pipeline against the bare model, measured in one run, printed as JSON.

Starts its own redis-server and nx-27017 on spare ports, chunks real transcripts,
then for the full model and for the model cut to its first transformer layer (the
"fast" regime, where queue and store overhead show as they will on a GPU):

- bare: `SentenceTransformer.encode` of the texts the pipeline has to embed, same
  micro-batch size, same model object;
- pipeline: one job enqueued on RQ and drained by the worker (SimpleWorker), from
  the first dequeue to the last stored vector, ledger and counters included.

ratio = pipeline chunks/s / bare chunks/s over the same texts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from config.services import on_spare_ports, services_down, services_up  # noqa: E402
from config.settings import Settings  # noqa: E402
from producer.connections import mongo_database, redis_client  # noqa: E402
from producer.enqueue import chunk_episodes, enqueue_chunks, parse_files, vector_spec  # noqa: E402
from tests.bench.corpus import seenunseen_vtt  # noqa: E402
from worker import embedder as embedder_module  # noqa: E402
from worker.loop import make_worker  # noqa: E402
from worker.store import text_key  # noqa: E402


def run_pipeline(settings: Settings, chunks, episodes: int, label: str) -> dict:
    """Enqueue one job and drain it; seconds from the worker's start to its end."""
    settings = settings.replace(mongo_db=f"bench_{label}_{os.getpid()}")
    redis = redis_client(settings)
    redis.flushdb()
    db = mongo_database(settings)
    spec = vector_spec(settings)
    began = time.perf_counter()
    job = enqueue_chunks(settings, redis, db, chunks=chunks, episodes=episodes, kind="ingest", spec=spec)
    enqueue_seconds = time.perf_counter() - began
    worker, _ = make_worker(settings, redis)
    loads = embedder_module.load_count()
    began = time.perf_counter()
    worker.work(burst=True, logging_level="WARNING")
    seconds = time.perf_counter() - began
    ledger = list(db.batches.find({"job_id": job.job_id}))
    stored = db.embeddings.count_documents({})
    db.client.drop_database(db.name)
    return {
        "seconds": seconds,
        "chunks": job.chunks,
        "stored": stored,
        "embedded": sum(e["n_embedded"] for e in ledger),
        "skipped": sum(e["n_skipped"] for e in ledger),
        "tokens": sum(e["n_tokens"] for e in ledger),
        "padded_tokens": sum(e["padded_tokens"] for e in ledger),
        "compute_seconds": sum(e["gpu_seconds"] for e in ledger),
        "store_wait_seconds": sum(e["store_wait_seconds"] for e in ledger),
        "batches": len(ledger),
        "enqueue_seconds": enqueue_seconds,
        "model_loads_during_run": embedder_module.load_count() - loads,
    }


def run_bare(model, texts: list[str], settings: Settings) -> float:
    began = time.perf_counter()
    model.encode(texts, prompt=settings.instruction, batch_size=settings.micro_batch_size,
                 normalize_embeddings=settings.normalize, show_progress_bar=False)
    return time.perf_counter() - began


def measure(settings: Settings, model, chunks, episodes: int, label: str) -> dict:
    spec = vector_spec(settings)
    unique = list({text_key(c.text, spec): c.text for c in chunks}.values())
    # Bare first and last around the pipeline, so drift of this noisy machine shows and averages out.
    bare_a = run_bare(model, unique, settings)
    pipe = run_pipeline(settings, chunks, episodes, label)
    bare_b = run_bare(model, unique, settings)
    bare = (bare_a + bare_b) / 2
    assert pipe["stored"] == len(chunks), pipe
    return {
        "bare_seconds": bare,
        "bare_seconds_spread": abs(bare_a - bare_b),
        "encode_chunks_per_s": len(unique) / bare,
        "pipeline_chunks_per_s": pipe["embedded"] / pipe["seconds"],
        "ratio": (pipe["embedded"] / pipe["seconds"]) / (len(unique) / bare),
        **pipe,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder of transcripts (default: the vendored seenunseen corpus)")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--max-chunks", type=int, default=0, help="cap for a shorter run (0: all)")
    args = parser.parse_args()

    files = (sorted(args.data.glob("*.vtt"), key=lambda p: int("".join(filter(str.isdigit, p.stem)) or 0))
             if args.data else seenunseen_vtt())
    with tempfile.TemporaryDirectory() as tmp:
        settings = on_spare_ports(Settings.from_env(retry_intervals=()), Path(tmp))
        services_up(settings)
        try:
            episodes, refused = parse_files(files[: args.episodes])
            chunks = chunk_episodes(settings, episodes, vector_spec(settings))
            if args.max_chunks:
                chunks = chunks[: args.max_chunks]
            spec = vector_spec(settings)
            embedder = embedder_module.get_embedder(
                settings.model_source(), revision=None, pool_instruction=spec.pool_instruction,
                micro_batch_size=settings.micro_batch_size,
            )
            full = measure(settings, embedder.model, chunks, len(episodes), "full")
            # The fast regime: the same model object cut to its first transformer layer.
            encoder = embedder.model[0].auto_model.encoder
            encoder.layer = encoder.layer[:1]
            fast = measure(settings, embedder.model, chunks, len(episodes), "fast")
        finally:
            services_down(settings)

    unique = len({text_key(c.text, spec) for c in chunks})
    print(json.dumps({
        "machine": f"{os.cpu_count()} CPUs, torch threads {embedder_module.torch.get_num_threads()}",
        "model": settings.model,
        "device": embedder.device_name,
        "episodes": len(episodes),
        "refused": refused,
        "chunks": len(chunks),
        "micro_batch_size": settings.micro_batch_size,
        "batch_max_chunks": settings.batch_max_chunks,
        "encode_chunks_per_s": round(full["encode_chunks_per_s"], 2),
        "pipeline_chunks_per_s": round(full["pipeline_chunks_per_s"], 2),
        "ratio": round(full["ratio"], 4),
        "fast_encode_chunks_per_s": round(fast["encode_chunks_per_s"], 2),
        "fast_pipeline_chunks_per_s": round(fast["pipeline_chunks_per_s"], 2),
        "fast_ratio": round(fast["ratio"], 4),
        "padding_fraction": round(1 - full["tokens"] / full["padded_tokens"], 4),
        "store_seconds_fraction": round(full["store_wait_seconds"] / full["seconds"], 4),
        "fast_store_seconds_fraction": round(fast["store_wait_seconds"] / fast["seconds"], 4),
        "enqueue_chunks_per_s": round(len(chunks) / full["enqueue_seconds"], 1),
        "model_loads": embedder_module.load_count(),
        "model_loads_during_runs": full["model_loads_during_run"] + fast["model_loads_during_run"],
        "dedupe_saved": len(chunks) - unique,
        "full": full,
        "fast": fast,
    }, indent=2))


if __name__ == "__main__":
    main()
