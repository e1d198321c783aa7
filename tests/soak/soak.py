"""`make soak`: fault drills on real processes, 10,000+ generated bad inputs, 20,000+ chunks through two
workers; one JSON document on stdout (RELIABILITY.md records it).

Starts its own redis-server (append-only) and nx-27017 on spare ports, data in a temporary
folder, and stops them at the end. Workers are `python -m worker.cli work` processes with the
default settings (heartbeat 10 s, maintenance 15 s, retries after 10, 60, 300 s) unless a drill
says otherwise, and one torch thread each (two workers share this machine's cores).

- kill:  two workers (prefetch on, the default); one is SIGKILLed holding a batch on the model and one
         fetched ahead; the other must finish the job.
- poison: job hashes rq cannot load, one ahead of the real batches on the queue and one due in the
         retry schedule; two workers, one SIGKILLed as in `kill`: the batches come back in the usual
         time, and a burst worker run afterwards exits 0.
- mongo: two workers; nx-27017 stopped for a while mid-run (workers give up on it after 2 s),
         then started again.
- redis: two workers; redis-server stopped for a while mid-run, then started again; a worker
         that ended for want of Redis is started again, as its supervisor would.
- fuzz:  the strategies of tests/test_fuzz.py through every parser and through POST /jobs.
- load:  every real VTT episode at 96-token chunks through two workers: RSS per worker as the
         job grows, Redis memory before, at its peak and once results have expired.
- oversize: 20 MB single-line and single-word files and a 1,000,000-cue WebVTT through `ingest`,
         8 MB single-line POSTs (one, then three at once) through `serve`: peak RSS of each process
         (tests/soak/oversize.py).
- hostile: adversarial shapes through the parser (seconds, doubling ratios), and hostile requests
         through `serve`: a 110-byte regex bomb, trickled bodies with and without a token, a foreign
         Host, job ids naming other keys, schemathesis over the OpenAPI document (tests/soak/hostile.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given  # noqa: E402
from hypothesis import settings as hypothesis_settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from rq.job import Job  # noqa: E402
from rq.registry import StartedJobRegistry  # noqa: E402
from rq.serializers import JSONSerializer  # noqa: E402

from config.services import local_services, on_spare_ports, services_down, services_up  # noqa: E402
from config.settings import Settings  # noqa: E402
from producer.connections import mongo_database, redis_client  # noqa: E402
from producer.enqueue import batch_queue, ingest, parse_files, vector_spec  # noqa: E402
from producer.jobs import JobRecords  # noqa: E402
from producer.streaming import chunk_episodes  # noqa: E402
from producer.web.api import create_app  # noqa: E402
from tests.bench.corpus import seenunseen_vtt  # noqa: E402
from tests.soak.harness import (  # noqa: E402
    WorkerProcess,
    audit,
    counters_exact,
    run_cli,
    start_worker,
    wait_until,
    worker_env,
)
from tests.soak.hostile import drill_hostile  # noqa: E402
from tests.soak.oversize import drill_oversize  # noqa: E402
from tests.test_fuzz import AUTH, BODIES, INPUTS, NAMES, TOKEN, check_parse, check_post  # noqa: E402


class Run:
    """One job on fresh stores, worked by real worker processes."""

    def __init__(self, settings: Settings, name: str, logs: Path, paths: list[Path], **worker_settings: object):
        self.settings = settings.replace(mongo_db=f"soak_{name}")
        self.redis = redis_client(self.settings)
        self.redis.flushdb()
        self.db = mongo_database(self.settings)
        self.db.client.drop_database(self.db.name)
        self.records = JobRecords(self.redis, self.db, self.settings.result_ttl)
        self.name, self.logs = name, logs
        self.env = worker_env(self.settings.redis_url, self.settings.mongo_uri, self.settings.mongo_db,
                              **worker_settings)
        self.env["OMP_NUM_THREADS"] = "1"
        episodes, refused = parse_files(paths, podcast="The Seen and the Unseen")
        self.refused = refused
        self.chunks = chunk_episodes(self.settings, episodes, vector_spec(self.settings))
        self.job = ingest(self.settings, self.redis, self.db, episodes, kind="ingest")
        self.batch_ids = self.records.batch_ids(self.job.job_id)
        self.workers: list[WorkerProcess] = []

    def start_worker(self) -> WorkerProcess:
        worker = start_worker(self.env, self.logs / f"{self.name}-{len(self.workers)}.log")
        self.workers.append(worker)
        return worker

    def finished(self) -> bool:
        return self.records.status(self.job.job_id).state == "finished"

    def wait_finished(self, timeout: float) -> float:
        what = f"{self.name}: job {self.job.job_id}"
        return wait_until(self.finished, timeout=timeout, interval=0.5,
                          what=lambda: "\n".join([what, *(w.log_tail(15) for w in self.workers)]))

    def retries_used(self) -> int:
        jobs = Job.fetch_many(self.batch_ids, connection=self.redis, serializer=JSONSerializer)
        return sum(len(self.settings.retry_intervals) - j.retries_left for j in jobs if j is not None)

    def report(self, **figures: object) -> dict:
        status = self.records.status(self.job.job_id)
        found = audit(self.db, self.job.job_id, [c.chunk_id for c in self.chunks], self.batch_ids)
        return {
            "drill": self.name, "chunks": len(self.chunks), "batches": len(self.batch_ids),
            "embedded": status.chunks.embedded, "skipped": status.chunks.skipped,
            "lost": found.lost, "duplicated": found.duplicated,
            "ledger_entries": found.ledger_entries,
            "ledger_exact": not (found.ledger_missing or found.ledger_duplicated),
            "counters_exact": counters_exact(status), "survived": found.exact and counters_exact(status),
            "retries_used": self.retries_used(), **figures,
        }

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


def _holding_ahead(run: Run) -> tuple[list[str], WorkerProcess] | None:
    """A worker with a batch on the model and at least one fetched ahead (all registered started)."""
    started = StartedJobRegistry(run.settings.queue_name, connection=run.redis, serializer=JSONSerializer)
    held = started.get_job_ids(cleanup=False)
    holders = [j.worker_name or "" if j else "" for j in Job.fetch_many(held, run.redis, JSONSerializer)]
    for worker in run.workers:
        mine = [b for b, h in zip(held, holders, strict=True) if h.endswith(f":{worker.process.pid}")]
        if len(mine) >= 2:
            return mine, worker
    return None


def _wait_holding_ahead(run: Run) -> tuple[list[str], WorkerProcess]:
    wait_until(lambda: run.finished() or _holding_ahead(run) is not None, timeout=300,
               what=f"{run.name}: a worker with a batch fetched ahead", interval=0.02)
    if (held := _holding_ahead(run)) is None:
        raise RuntimeError(f"{run.name}: the job finished before a worker was seen holding a batch fetched ahead")
    return held


def _kill_one_holding_ahead(run: Run) -> dict:
    """Two workers; SIGKILL one holding a batch on the model and one fetched ahead; the other finishes the job."""
    run.start_worker(), run.start_worker()
    killed, victim = _wait_holding_ahead(run)
    victim.kill()
    killed_at = time.monotonic()
    done = f"podembed:job:{run.job.job_id}:done"
    batches_back = wait_until(lambda: all(run.redis.sismember(done, b) for b in killed), timeout=600,
                              what=f"{run.name}: killed batches", interval=0.5)
    run.wait_finished(600)
    return {"killed_batches": killed, "killed_batches_done_after_s": round(batches_back, 1),
            "job_done_after_kill_s": round(time.monotonic() - killed_at, 1)}


def drill_kill(settings: Settings, logs: Path, paths: list[Path]) -> dict:
    run = Run(settings, "kill", logs, paths)
    try:
        return run.report(**_kill_one_holding_ahead(run))
    finally:
        run.stop()


def drill_poison(settings: Settings, logs: Path, paths: list[Path]) -> dict:
    """Job hashes rq cannot load, ahead of the real batches and due in the retry schedule, then a SIGKILL:
    the workers go on, the killed worker's batches come back in the usual time (no lock left to expire),
    and a burst worker afterwards exits 0."""
    run = Run(settings, "poison", logs, paths)
    queue = batch_queue(run.settings, run.redis)
    data = run.redis.hget(f"rq:job:{run.batch_ids[0]}", "data")
    for poison in ("poison-queued", "poison-scheduled"):
        # Valid data, a created_at that is not a date: what stopped every worker before.
        run.redis.hset(f"rq:job:{poison}", mapping={"data": data, "created_at": "yesterday", "origin": "podembed",
                                                     "status": "queued"})
    run.redis.lpush(queue.key, "poison-queued")
    run.redis.zadd(queue.scheduled_job_registry.key, {"poison-scheduled": time.time() - 60})
    try:
        killed = _kill_one_holding_ahead(run)
        run.stop()
        burst = run_cli(run.env, "work", "--burst", timeout=300)
        left = [p for p in ("poison-queued", "poison-scheduled")
                if p in queue.job_ids or p in queue.scheduled_job_registry.get_job_ids()]
        return run.report(poison_jobs=2, poison_left_on_queue=left, burst_worker_exit_code=burst.returncode,
                          **killed)
    finally:
        run.stop()


def drill_mongo(settings: Settings, logs: Path, paths: list[Path], outage_s: float) -> dict:
    run = Run(settings, "mongo", logs, paths, mongo_timeout_ms=2000)
    mongo = local_services(settings)[1]
    try:
        run.start_worker(), run.start_worker()
        _wait_holding_ahead(run)
        mongo.stop()
        time.sleep(outage_s)
        services_up(settings)
        back = run.wait_finished(900)
        return run.report(outage_s=outage_s, job_done_after_mongo_back_s=round(back, 1))
    finally:
        services_up(settings)
        run.stop()


def drill_redis(settings: Settings, logs: Path, paths: list[Path], outage_s: float) -> dict:
    run = Run(settings, "redis", logs, paths)
    redis_service = local_services(settings)[0]
    try:
        run.start_worker(), run.start_worker()
        _wait_holding_ahead(run)
        redis_service.stop()
        time.sleep(outage_s)
        services_up(settings)
        ended = [w for w in run.workers if w.process.poll() is not None]
        for _ in ended:
            run.start_worker()
        back = run.wait_finished(900)
        return run.report(outage_s=outage_s, workers_ended_without_redis=len(ended),
                          job_done_after_redis_back_s=round(back, 1))
    finally:
        services_up(settings)
        run.stop()


def _count_examples(strategy: st.SearchStrategy, n: int, check: Callable[[object], bool]) -> dict:
    """Run `check` on `n` generated examples: how many were tried, accepted and refused, and any failure."""
    outcomes: Counter[str] = Counter()

    @hypothesis_settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(example=strategy)
    def run(example: object) -> None:
        outcomes["accepted" if check(example) else "refused"] += 1

    began = time.perf_counter()
    try:
        run()
        failure = None
    except Exception as exc:  # a crash, a hang or a refusal without the file's name: the figure to report
        failure = f"{type(exc).__name__}: {exc}"[:2000]
    return {"tried": outcomes.total(), **outcomes, "failure": failure, "seconds": round(time.perf_counter() - began, 1)}


def fuzz(settings: Settings, n_parse: int, n_api: int) -> dict:
    parsers = _count_examples(st.tuples(INPUTS, st.sampled_from(NAMES)), n_parse, lambda e: check_parse(*e))
    api_settings = settings.replace(mongo_db="soak_fuzz", api_token=TOKEN)
    redis, db = redis_client(api_settings), mongo_database(api_settings)
    redis.flushdb()
    client = TestClient(create_app(api_settings), base_url="http://127.0.0.1")  # a host name `serve` answers
    assert AUTH["Authorization"].endswith(TOKEN)
    post_jobs = _count_examples(BODIES, n_api, lambda body: check_post(client, redis, db, body))
    db.client.drop_database(db.name)
    redis.flushdb()
    return {"parsers": parsers, "post_jobs": post_jobs}


def _redis_memory(settings: Settings) -> dict:
    redis = redis_client(settings)
    memory = redis.info("memory")
    return {"used_memory": memory["used_memory"], "used_memory_dataset": memory["used_memory_dataset"],
            "keys": redis.dbsize()}


def load(settings: Settings, logs: Path, paths: list[Path], chunk_tokens: int, result_ttl: int) -> dict:
    settings = settings.replace(chunk_tokens=chunk_tokens, result_ttl=result_ttl)
    redis_client(settings).flushdb()
    before = _redis_memory(settings)
    began = time.perf_counter()
    run = Run(settings, "load", logs, paths, chunk_tokens=chunk_tokens, result_ttl=result_ttl)
    enqueued_s = time.perf_counter() - began
    after_enqueue = _redis_memory(settings)
    samples: list[dict] = []
    try:
        workers = [run.start_worker(), run.start_worker()]
        began = time.perf_counter()
        while True:
            status = run.records.status(run.job.job_id)
            samples.append({"done": status.chunks.embedded + status.chunks.skipped,
                            "rss_kb": [w.memory_kb()[0] for w in workers]})
            if status.state == "finished":
                break
            if time.perf_counter() - began > 3600:
                raise TimeoutError("load: job not finished within an hour")
            time.sleep(2)
        seconds = time.perf_counter() - began
        peak_kb = [w.memory_kb()[1] for w in workers]
        report = run.report(seconds=round(seconds, 1), chunks_per_second=round(len(run.chunks) / seconds, 1))
        # Results, job records and finished-registry entries expire; the workers' maintenance sweeps.
        time.sleep(result_ttl + 2 * settings.maintenance_interval)
    finally:
        run.stop()
    # A stopped worker's record stays for 60 s (rq's register_death).
    wait_until(lambda: not run.redis.keys("rq:worker:*"), timeout=120, what="load: worker records", interval=1)
    after = _redis_memory(settings)
    leftover = sorted(k.decode() for k in run.redis.keys("*")) if after["keys"] <= 20 else None

    def rss_at(fraction: float) -> list[float]:
        sample = next((s for s in samples if s["done"] >= fraction * len(run.chunks)), None)
        return [round(kb / 1024, 1) for kb in sample["rss_kb"]] if sample else []

    return {
        **report, "episodes": run.job.episodes, "refused_files": run.refused, "chunk_tokens": chunk_tokens,
        "workers": 2, "enqueue_seconds": round(enqueued_s, 1),
        "peak_rss_mb": [round(kb / 1024, 1) for kb in peak_kb],
        "rss_mb_at_progress": {f"{10 * tenth}%": rss_at(tenth / 10) for tenth in range(1, 11)},
        "redis_memory": {"before": before, "after_enqueue": after_enqueue, "after_results_expired": after,
                         "result_ttl_s": result_ttl, "keys_left": leftover},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fuzz", type=int, default=10_000, help="generated inputs through the parsers")
    parser.add_argument("--api-fuzz", type=int, default=1_000, help="generated bodies through POST /jobs")
    parser.add_argument("--drill-episodes", type=int, default=20, help="real episodes per fault drill")
    parser.add_argument("--load-episodes", type=int, default=120, help="real episodes in the load run")
    parser.add_argument("--load-chunk-tokens", type=int, default=96, help="chunk size of the load run")
    parser.add_argument("--outage", type=float, default=20.0, help="seconds MongoDB and Redis stay down")
    parser.add_argument("--result-ttl", type=int, default=30, help="seconds results stay in Redis (load run)")
    args = parser.parse_args()

    episodes = seenunseen_vtt()
    drill_paths = episodes[: args.drill_episodes]
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="podembed-soak-") as tmp:
        settings = on_spare_ports(Settings.from_env(), Path(tmp) / "services")
        logs = Path(tmp) / "logs"
        logs.mkdir()
        services_up(settings)
        try:
            inputs = fuzz(settings, args.fuzz, args.api_fuzz)
            drills = [drill_kill(settings, logs, drill_paths),
                      drill_poison(settings, logs, drill_paths),
                      drill_mongo(settings, logs, drill_paths, args.outage),
                      drill_redis(settings, logs, drill_paths, args.outage)]
            loaded = load(settings, logs, episodes[: args.load_episodes], args.load_chunk_tokens, args.result_ttl)
            oversize = drill_oversize(settings, Path(tmp) / "oversize")
            hostile = drill_hostile(settings, logs / "hostile")
        finally:
            services_down(settings)
    runs = [*drills, loaded]
    print(json.dumps({
        "command": "make soak",
        "faults_survived": sum(d["survived"] for d in drills), "faults": len(drills),
        "inputs_tried": inputs["parsers"]["tried"] + inputs["post_jobs"]["tried"],
        "input_failures": [f for f in (inputs["parsers"]["failure"], inputs["post_jobs"]["failure"]) if f],
        "chunks_processed": sum(r["chunks"] for r in runs),
        "lost": sum(r["lost"] for r in runs), "duplicated": sum(r["duplicated"] for r in runs),
        "peak_rss_mb_per_worker": loaded["peak_rss_mb"],
        "redis_used_memory": {k: loaded["redis_memory"][k]["used_memory"]
                              for k in ("before", "after_enqueue", "after_results_expired")},
        "drills": drills, "inputs": inputs, "load": loaded, "oversize": oversize, "hostile": hostile,
        "seconds": round(time.perf_counter() - began, 1), "cpus": os.cpu_count(),
    }, indent=2))


if __name__ == "__main__":
    main()
