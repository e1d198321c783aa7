"""`make bench`: the pipeline against the bare model, measured in one run, printed as JSON.

Starts its own redis-server and nx-27017 on spare ports, chunks real transcripts,
then for the full model and for the model cut to its first transformer layer (the
"fast" regime, where queue and store overhead show as they will on a GPU):

- bare: `SentenceTransformer.encode` of the texts the pipeline has to embed, same
  micro-batch size, same model object;
- pipeline: one job enqueued on RQ and drained by the pipelined worker loop, from the
  drain's start to its return, vectors, ledger and counters included.

ratio = pipeline chunks/s / bare chunks/s over the same texts; busy_fraction = the model's
compute seconds (from the ledger) / the drain's wall seconds; compute_vs_bare = those compute
seconds / the bare seconds, so ratio = busy_fraction / compute_vs_bare. Each drain is timed `--repeats`
times (3), with a bare run between every two: a single ratio over seconds-long runs moves by
±10 % here with the machine's load. The run with the median ratio is reported in full, and every
run's ratio is listed (`*_ratio_runs`).

Then the fast regime again over more episodes (>= 16 batches), with Redis and MongoDB
behind a TCP proxy that adds 0, 10, 40 and 80 ms to every round trip (`delay_proxy.py`),
as a managed Redis and Atlas are from a Modal GPU: wan_ratio_{N}ms, each against the bare
runs measured just before and after it. Round trips to Redis and MongoDB are counted during
every drain (`roundtrips.py`); `serial_round_trips_per_batch` is rq's own SimpleWorker loop
over the same stages, for comparison. The CPU is shared: compare ratios within one run.
`services_cpu_seconds`: the CPU the other processes (redis-server, nx-27017, the proxy) used during
a drain, on the 2 cores the model also needs (in production they are other machines).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import roundtrips  # noqa: E402

ROUND_TRIPS = roundtrips.install()  # before any client exists

from config.services import free_port, on_spare_ports, services_down, services_status, services_up  # noqa: E402
from config.settings import Settings  # noqa: E402
from producer.connections import mongo_database, redis_client  # noqa: E402
from producer.enqueue import enqueue_episodes, parse_files, vector_spec  # noqa: E402
from producer.models import text_key  # noqa: E402
from producer.streaming import chunk_episodes  # noqa: E402
from tests.bench.corpus import seenunseen_vtt  # noqa: E402
from worker import embedder as embedder_module  # noqa: E402
from worker.loop import drain, make_worker  # noqa: E402

WAN_RTTS_MS = (0, 10, 40, 80)


def cpu_seconds(pids: Sequence[int]) -> float:
    """The CPU seconds (user and system) these processes have used so far."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def run_pipeline(settings: Settings, episodes: list, label: str, *, serial: bool = False,
                 services: Sequence[int] = ()) -> dict:
    """Enqueue one job and drain it; seconds from the drain's start to its end, and the CPU seconds
    the `services` processes used meanwhile."""
    settings = settings.replace(mongo_db=f"bench_{label}_{os.getpid()}")
    redis = redis_client(settings)
    redis.flushdb()
    db = mongo_database(settings)
    spec = vector_spec(settings)
    began = time.perf_counter()
    job = enqueue_episodes(settings, redis, db, episodes, kind="ingest", spec=spec)
    enqueue_seconds = time.perf_counter() - began
    worker, _ = make_worker(settings, redis)
    loads = embedder_module.load_count()
    ROUND_TRIPS.reset()
    services_before = cpu_seconds(services)
    began = time.perf_counter()
    if serial:
        worker.work(burst=True, logging_level="WARNING")  # rq's SimpleWorker loop, one batch at a time
    else:
        drain(worker)
    seconds = time.perf_counter() - began
    services_cpu = cpu_seconds(services) - services_before
    ended = datetime.now(UTC)
    trips = (ROUND_TRIPS.redis, ROUND_TRIPS.mongo)
    ledger = list(db.batches.find({"job_id": job.job_id}))
    stored = db.embeddings.count_documents({})
    db.client.drop_database(db.name)
    db.client.close()
    redis.close()
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
        # From the last batch stored to the drain's return (an empty queue ends a drain promptly).
        "tail_seconds": (ended - max(e["finished_at"] for e in ledger)).total_seconds(),
        "redis_round_trips": trips[0],
        "mongo_round_trips": trips[1],
        "round_trips_per_batch": round(sum(trips) / max(1, len(ledger)), 1),
        "enqueue_seconds": enqueue_seconds,
        "model_loads_during_run": embedder_module.load_count() - loads,
        "services_cpu_seconds": services_cpu,
    }


def run_bare(model, texts: list[str], settings: Settings) -> float:
    """Seconds of `encode` over `texts`, run in a thread as the pipeline's embed lane runs the model
    (torch runs measurably faster off the main thread here, so both are timed the same way)."""
    seconds: list[float] = []

    def encode() -> None:
        began = time.perf_counter()
        model.encode(texts, prompt=settings.instruction, batch_size=settings.micro_batch_size,
                     normalize_embeddings=settings.normalize, show_progress_bar=False)
        seconds.append(time.perf_counter() - began)

    thread = threading.Thread(target=encode, name="bare")
    thread.start()
    thread.join()
    return seconds[0]


def service_pids(settings: Settings) -> list[int]:
    return [s.pid for s in services_status(settings) if s.pid is not None]


def measure(settings: Settings, model, chunks, episodes: list, label: str, repeats: int) -> list[dict]:
    """`repeats` drains of one job, each between two bare runs (the one after a drain is the one before
    the next), so the drift of this noisy machine shows and averages out."""
    spec = vector_spec(settings)
    unique = list({text_key(c.text, spec): c.text for c in chunks}.values())
    bare = [run_bare(model, unique, settings)]
    runs = []
    for n in range(repeats):
        pipe = run_pipeline(settings, episodes, f"{label}{n}", services=service_pids(settings))
        bare.append(run_bare(model, unique, settings))
        runs.append(_compare(pipe, bare[-2], bare[-1], len(unique), len(chunks)))
    return runs


def _compare(pipe: dict, bare_a: float, bare_b: float, unique: int, chunks: int) -> dict:
    bare = (bare_a + bare_b) / 2
    assert pipe["stored"] == chunks, pipe
    return {
        "bare_seconds": bare,
        "bare_seconds_spread": abs(bare_a - bare_b),
        "encode_chunks_per_s": unique / bare,
        "pipeline_chunks_per_s": pipe["embedded"] / pipe["seconds"],
        "ratio": (pipe["embedded"] / pipe["seconds"]) / (unique / bare),
        # The share of the drain's wall time the model was computing: measured on the same clock in
        # the same run, so the machine's load swings (which move `ratio`) barely touch it.
        "busy_fraction": pipe["compute_seconds"] / pipe["seconds"],
        # The model's own seconds in the drain over its bare seconds: above 1, the model ran slower
        # beside the drain's other work (its lanes, the services on the same cores) or the machine slowed.
        "compute_vs_bare": pipe["compute_seconds"] / bare,
        **pipe,
    }


def median_run(runs: list[dict]) -> dict:
    """The run whose ratio is the median (the lower middle of an even count): the one reported in full."""
    return sorted(runs, key=lambda r: r["ratio"])[(len(runs) - 1) // 2]


def measure_wan(settings: Settings, model, chunks, episodes: list, repeats: int) -> dict[int, list[dict]]:
    """The fast regime behind the delay proxy at each round trip, the round of them `repeats` times;
    a bare run between every two drains."""
    spec = vector_spec(settings)
    unique = list({text_key(c.text, spec): c.text for c in chunks}.values())
    redis_port, mongo_port = free_port(), free_port()
    wan = settings.replace(redis_url=f"redis://127.0.0.1:{redis_port}/0",
                           mongo_uri=f"mongodb://127.0.0.1:{mongo_port}/?directConnection=true")
    routes = [f"{redis_port}:127.0.0.1:{settings.redis_url.rsplit(':', 1)[1].split('/')[0]}",
              f"{mongo_port}:127.0.0.1:{settings.mongo_uri.rsplit(':', 1)[1].split('/')[0]}"]
    bare = [run_bare(model, unique, settings)]
    out: dict[int, list[dict]] = {rtt: [] for rtt in WAN_RTTS_MS}
    for n in range(repeats):
        for rtt in WAN_RTTS_MS:
            proxy = subprocess.Popen([sys.executable, str(Path(__file__).with_name("delay_proxy.py")), "--rtt-ms",
                                      str(rtt), *routes], stdout=subprocess.PIPE, text=True)
            try:
                assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
                pipe = run_pipeline(wan, episodes, f"wan{rtt}_{n}", services=[*service_pids(settings), proxy.pid])
            finally:
                proxy.terminate()
                proxy.wait()
            bare.append(run_bare(model, unique, settings))
            out[rtt].append(_compare(pipe, bare[-2], bare[-1], len(unique), len(chunks)))
    return out


def chunks_for(settings: Settings, files: list[Path], at_least: int) -> tuple[list, list]:
    """Chunks of the first episodes that give at least `at_least` chunks (all of them if fewer), and those episodes."""
    chunks: list = []
    episodes: list = []
    spec = vector_spec(settings)
    for path in files:
        parsed, _ = parse_files([path])
        chunks += chunk_episodes(settings, parsed, spec)
        episodes += parsed
        if len(chunks) >= at_least:
            break
    return chunks, episodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder of transcripts (default: the vendored seenunseen corpus)")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--wan-batches", type=int, default=17, help="batches of the runs behind the proxy")
    parser.add_argument("--repeats", type=int, default=3, help="drains of each kind; the median ratio's is reported")
    args = parser.parse_args()

    files = (sorted(args.data.glob("*.vtt"), key=lambda p: int("".join(filter(str.isdigit, p.stem)) or 0))
             if args.data else seenunseen_vtt())
    with tempfile.TemporaryDirectory() as tmp:
        settings = on_spare_ports(Settings.from_env(retry_intervals=()), Path(tmp))
        services_up(settings)
        try:
            episodes, refused = parse_files(files[: args.episodes])
            chunks = chunk_episodes(settings, episodes, vector_spec(settings))
            spec = vector_spec(settings)
            embedder = embedder_module.get_embedder(
                settings.model_source(), revision=None, pool_instruction=spec.pool_instruction,
                micro_batch_size=settings.micro_batch_size,
            )
            full_runs = measure(settings, embedder.model, chunks, episodes, "full", args.repeats)
            # The fast regime: the same model object cut to its first transformer layer.
            encoder = embedder.model[0].auto_model.encoder
            encoder.layer = encoder.layer[:1]
            fast_runs = measure(settings, embedder.model, chunks, episodes, "fast", args.repeats)
            serial = run_pipeline(settings, episodes, "serial", serial=True)
            wan_chunks, wan_episodes = chunks_for(settings, files, args.wan_batches * settings.batch_max_chunks)
            wan_runs = measure_wan(settings, embedder.model, wan_chunks, wan_episodes, args.repeats)
        finally:
            services_down(settings)

    unique = len({text_key(c.text, spec) for c in chunks})
    full, fast = median_run(full_runs), median_run(fast_runs)
    wan = {rtt: median_run(runs) for rtt, runs in wan_runs.items()}
    every = [*full_runs, *fast_runs, *(r for runs in wan_runs.values() for r in runs)]
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
        "repeats": args.repeats,
        "ratio_runs": [round(r["ratio"], 4) for r in full_runs],
        "fast_ratio_runs": [round(r["ratio"], 4) for r in fast_runs],
        "wan_ratio_runs": {f"{rtt}ms": [round(r["ratio"], 4) for r in runs] for rtt, runs in wan_runs.items()},
        "padding_fraction": round(1 - full["tokens"] / full["padded_tokens"], 4),
        "store_seconds_fraction": round(full["store_wait_seconds"] / full["seconds"], 4),
        "fast_store_seconds_fraction": round(fast["store_wait_seconds"] / fast["seconds"], 4),
        "enqueue_chunks_per_s": round(len(chunks) / full["enqueue_seconds"], 1),
        "round_trips_per_batch": fast["round_trips_per_batch"],
        "serial_round_trips_per_batch": serial["round_trips_per_batch"],
        **{f"wan_ratio_{rtt}ms": round(run["ratio"], 4) for rtt, run in wan.items()},
        "busy_fraction": round(full["busy_fraction"], 4),
        "fast_busy_fraction": round(fast["busy_fraction"], 4),
        **{f"wan_busy_fraction_{rtt}ms": round(run["busy_fraction"], 4) for rtt, run in wan.items()},
        "compute_vs_bare": round(full["compute_vs_bare"], 4),
        "fast_compute_vs_bare": round(fast["compute_vs_bare"], 4),
        "wan_compute_vs_bare": {f"{rtt}ms": round(run["compute_vs_bare"], 4) for rtt, run in wan.items()},
        "wan_batches": wan[0]["batches"],
        "wan_chunks": len(wan_chunks),
        "wan_round_trips_per_batch": {f"{rtt}ms": run["round_trips_per_batch"] for rtt, run in wan.items()},
        # CPU seconds redis-server, nx-27017 (and the proxy) took on the model's cores during the drain.
        "fast_services_cpu_seconds": round(fast["services_cpu_seconds"], 2),
        "wan_services_cpu_seconds": {f"{rtt}ms": round(run["services_cpu_seconds"], 2) for rtt, run in wan.items()},
        "drain_tail_seconds_max": round(max(r["tail_seconds"] for r in every), 3),
        "model_loads": embedder_module.load_count(),
        "model_loads_during_runs": sum(r["model_loads_during_run"] for r in (*every, serial)),
        "dedupe_saved": len(chunks) - unique,
        "full": full,
        "fast": fast,
        "serial": serial,
        "wan": {f"{rtt}ms": run for rtt, run in wan.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
