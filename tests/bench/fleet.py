"""`make fleet`: a simulation of the control plane, 1 to 64 drains on one queue (one JSON document).

Real redis-server and nx-27017 on spare ports, a backlog of real transcripts (marked copies of the
vendored seenunseen episodes, `tests.bench.scale.build_catalog`) enqueued through the real producer,
and N drain processes running the real drain (`worker.pipeline.run_drain`, `worker.loop.make_worker`).
The model is replaced by a declared stand-in (`StandInEmbedder`): it waits the batch's compute time
(`--compute-s` per full batch of `batch_max_tokens`, scaled by `--time-scale`) and returns
deterministic unit vectors of the production dimension (768). Nothing else is simulated: queues,
priority, heartbeats, maintenance, MongoDB writes and the ledger are the project's own code.

Per N: batches/s and scaling efficiency (throughput(N) / (N x throughput(1))), Redis commands per
batch (INFO commandstats) and Redis CPU per 1,000 batches (INFO cpu), MongoDB operations and bytes
per batch (pymongo command monitoring in the drains), maintenance passes per minute over the fleet,
take latency, client CPU per batch, all over the steady window (from 10 % to 40 % of the batches
stored). At N = 16 the run also enqueues an ingest job of a few batches (priority) and SIGKILLs a
quarter of the drains, starting replacements (faults). Then the launcher: its real plan
(`modal_jobs.launcher.plan_launch`, `launch`) every `--launcher-period`, with `spawn` starting a
stand-in drain process after `--cold-start` seconds, on a backlog that a nightly job joins.

Drains are forked from this process (torch and the project imported once): 64 fresh interpreters
would spend minutes importing on this host.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bson  # noqa: E402
import numpy as np  # noqa: E402
from pymongo import monitoring  # noqa: E402
from pymongo.database import Database  # noqa: E402
from redis import Redis  # noqa: E402
from rq.job import Job  # noqa: E402
from rq.serializers import JSONSerializer  # noqa: E402

from config.services import on_spare_ports, services_down, services_up  # noqa: E402
from config.settings import Settings  # noqa: E402
from modal_jobs.launcher import launch, plan_launch  # noqa: E402
from modal_jobs.settings import ModalSettings  # noqa: E402
from modal_jobs.spawns import SpawnLedger  # noqa: E402
from producer.batches import upkeep  # noqa: E402
from producer.batches.take import PriorityTake, Taken  # noqa: E402
from producer.connections import mongo_database, redis_client  # noqa: E402
from producer.enqueue import EnqueuedJob, ingest, parse_files  # noqa: E402
from producer.jobs import JobRecords  # noqa: E402
from producer.models import Episode  # noqa: E402
from tests.bench.scale import build_catalog, fresh  # noqa: E402
from tests.soak.harness import audit, counters_exact  # noqa: E402
from worker import pipeline  # noqa: E402
from worker.embedder import Embedder, EncodeStats, ModelKey  # noqa: E402
from worker.loop import make_worker  # noqa: E402
from worker.tasks import WorkerContext, init_context  # noqa: E402

DIM = 768  # instructor-xl's
# What the ledger records as the stand-in's device: the launcher's throughput reads the ledger by GPU type.
STAND_IN_DEVICE = "NVIDIA A10G (stand-in)"
CHUNKS_PER_EPISODE = 54.8  # the vendored corpus: 6,572 chunks in 120 episodes at the default settings
# The steady window, as shares of the backfill's batches stored: it ends while the queue still holds more
# batches than the fleet can hold (N x (prefetch + 1)), so no drain waits on an empty queue in it.
WINDOW = (0.10, 0.40)
KILL_AT = 0.60  # the N = 16 run: the ingest job is enqueued after the window, a quarter killed after it ended
SAMPLE_S = 0.25


# --- in the drain processes ---------------------------------------------------------------------------------


class StandInEmbedder(Embedder):
    """The declared stand-in for the model: no weights, a wait for the compute time, unit vectors.

    Waits `seconds_per_token` for each token of each micro-batch (so progress reports come per forward
    pass, as the model's do) and returns, for each text, a unit vector drawn from its hash.
    """

    def __init__(self, key: ModelKey, *, seconds_per_token: float, micro_batch_size: int) -> None:
        self.key = key
        self._configured = None
        self.configure(micro_batch_size, 0)
        self.device_name = STAND_IN_DEVICE
        self.dim = DIM
        self.seconds_per_token = seconds_per_token

    def prompt_tokens(self, instruction: str) -> int:
        return 0  # the chunks' token counts carry the compute time

    def encode(self, texts: Sequence[str], lengths: Sequence[int], *, instruction: str, normalize: bool,
               on_vectors: Callable[[list[int], np.ndarray], None] | None = None) -> tuple[np.ndarray, EncodeStats]:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        stats = EncodeStats()
        for start in range(0, len(texts), self.micro_batch_size):
            indices = list(range(start, min(start + self.micro_batch_size, len(texts))))
            began = time.perf_counter()
            time.sleep(self.seconds_per_token * sum(lengths[i] for i in indices))
            vectors = np.stack([unit_vector(texts[i], self.dim) for i in indices])
            stats.seconds += time.perf_counter() - began
            stats.n_tokens += sum(lengths[i] for i in indices)
            stats.padded_tokens += max(lengths[i] for i in indices) * len(indices)
            stats.forward_passes += 1
            out[indices] = vectors
            if on_vectors is not None:
                on_vectors(indices, vectors)
        return out, stats


def unit_vector(text: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


@dataclass
class StandInContext(WorkerContext):
    """A worker context whose one model is the stand-in."""

    stand_in: StandInEmbedder | None = None

    def embedder(self, spec: object) -> Embedder:
        assert self.stand_in is not None
        return self.stand_in


@dataclass
class Meter:
    """What one drain process did, written to its stats file every SAMPLE_S (a SIGKILL keeps the last)."""

    mongo_ops: int = 0
    mongo_bytes_out: int = 0
    mongo_bytes_in: int = 0
    meter_cpu_s: float = 0.0  # the meter's own encoding, taken off the process' CPU
    takes: list[tuple[float, float]] = field(default_factory=list)  # (Unix time, ms) of each take of a batch
    passes: list[tuple[float, bool]] = field(default_factory=list)  # (Unix time, the drain's first) of each pass

    def cpu_s(self) -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime - self.meter_cpu_s

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"cpu_s": self.cpu_s(), "mongo_ops": self.mongo_ops,
                                   "mongo_bytes_out": self.mongo_bytes_out, "mongo_bytes_in": self.mongo_bytes_in,
                                   "takes": self.takes, "passes": self.passes}))
        tmp.rename(path)


class MongoMeter(monitoring.CommandListener):
    def __init__(self, meter: Meter) -> None:
        self.meter = meter

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        began = time.thread_time()
        self.meter.mongo_ops += 1
        self.meter.mongo_bytes_out += len(bson.encode(event.command))
        self.meter.meter_cpu_s += time.thread_time() - began

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        began = time.thread_time()
        self.meter.mongo_bytes_in += len(bson.encode(event.reply))
        self.meter.meter_cpu_s += time.thread_time() - began

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@dataclass(frozen=True)
class DrainPlan:
    settings: Settings
    name: str
    stats: Path
    seconds_per_token: float
    burst: bool = False
    budget_s: float | None = None
    spawn_id: str | None = None


def drain_process(plan: DrainPlan) -> None:
    """One drain: the real worker and pipeline with the stand-in model, metered. Runs in a forked child."""
    meter = Meter()
    monitoring.register(MongoMeter(meter))  # before this process' clients are made
    measured_take, measured_maintain = _metered(meter)
    pipeline.PriorityTake, pipeline.maintain = measured_take, measured_maintain
    settings = plan.settings
    redis = redis_client(settings)
    base = init_context(settings, redis)
    key = ModelKey(source=settings.model_source(), revision=settings.model_revision, device="cuda",
                   pool_instruction=False)
    ctx = StandInContext(**{f.name: getattr(base, f.name) for f in fields(WorkerContext)},
                         stand_in=StandInEmbedder(key, seconds_per_token=plan.seconds_per_token,
                                                  micro_batch_size=settings.micro_batch_size))
    worker, ctx = make_worker(settings, redis, name=plan.name, ctx=ctx)
    stop = threading.Event()

    def report() -> None:
        while not stop.wait(SAMPLE_S):
            meter.write(plan.stats)

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    if plan.spawn_id:
        SpawnLedger(redis, settings.queue_name).started(plan.spawn_id)
    try:
        pipeline.run_drain(worker, ctx, time_budget_s=plan.budget_s, burst=plan.burst)
    finally:
        stop.set()
        reporter.join()
        meter.write(plan.stats)


def _metered(meter: Meter) -> tuple[type[PriorityTake], Callable[..., bool]]:
    """The take and the maintenance pass of `worker.pipeline`, timed and counted into `meter`."""

    class MeteredTake(PriorityTake):
        def __call__(self):  # noqa: ANN204 (PriorityTake's)
            began = time.perf_counter()
            taken = super().__call__()
            if isinstance(taken, Taken):
                meter.takes.append((time.time(), (time.perf_counter() - began) * 1000))
            return taken

    def maintain(*args: object, **kwargs: object) -> bool:
        ran = upkeep.maintain(*args, **kwargs)
        if ran:
            meter.passes.append((time.time(), kwargs.get("every") is None))
        return ran

    return MeteredTake, maintain


# --- in the fleet's own process ----------------------------------------------------------------------------


@dataclass
class Drains:
    """The drain processes of one run, forked from this process."""

    settings: Settings
    stats: Path
    seconds_per_token: float
    processes: dict[str, multiprocessing.Process] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)  # name -> Unix time the process started
    ended: dict[str, float] = field(default_factory=dict)

    def start(self, name: str, **plan: object) -> None:
        process = multiprocessing.get_context("fork").Process(target=drain_process, name=name, args=(DrainPlan(
            self.settings, name, self.stats / f"{name}.json", self.seconds_per_token, **plan),))
        process.start()
        self.processes[name] = process
        self.started[name] = time.time()

    def alive(self) -> list[str]:
        # A copy: the launcher's spawns start drains from timer threads meanwhile.
        processes = dict(self.processes)
        for name, process in processes.items():
            if name not in self.ended and not process.is_alive():
                self.ended[name] = time.time()
        return [n for n in processes if n not in self.ended]

    def kill(self, names: Sequence[str]) -> None:
        for name in names:
            self.processes[name].kill()
        for name in names:
            self.processes[name].join()
            self.ended[name] = time.time()

    def stop(self) -> None:
        for name in self.alive():
            self.processes[name].terminate()
        for name, process in list(self.processes.items()):
            process.join(60)
            if process.is_alive():
                process.kill()
                process.join()
            self.ended.setdefault(name, time.time())

    def meters(self) -> list[dict]:
        out = []
        for path in self.stats.glob("*.json"):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # being replaced: rename makes that a moment
        return out


@dataclass
class Snapshot:
    at: float
    batches: int  # ledger entries
    commands: dict[str, int]
    redis_cpu_s: float
    client_cpu_s: float
    mongo_ops: int
    mongo_bytes: int

    @classmethod
    def take(cls, redis: Redis, db: Database, drains: Drains) -> Snapshot:
        stats = redis.info("commandstats")
        cpu = redis.info("cpu")
        meters = drains.meters()
        return cls(at=time.time(), batches=db.batches.count_documents({}),
                   commands={k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()},
                   redis_cpu_s=cpu["used_cpu_sys"] + cpu["used_cpu_user"],
                   client_cpu_s=sum(m["cpu_s"] for m in meters), mongo_ops=sum(m["mongo_ops"] for m in meters),
                   mongo_bytes=sum(m["mongo_bytes_out"] + m["mongo_bytes_in"] for m in meters))


def ledger_times(db: Database, **query: object) -> list[tuple[float, dict]]:
    """(finished_at as Unix time, entry) of the ledger entries, oldest first."""
    docs = db.batches.find(query, {"finished_at": 1, "job_id": 1, "worker": 1, "gpu_seconds": 1, "n_tokens": 1})
    return sorted(((_unix(d["finished_at"]), d) for d in docs), key=lambda pair: pair[0])


def _unix(at: datetime) -> float:
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


def enqueue(settings: Settings, redis: Redis, db: Database, episodes: list[Episode], kind: str) -> EnqueuedJob:
    return ingest(settings, redis, db, episodes, kind=kind)


def wait_for(what: str, done: Callable[[], bool], timeout: float) -> None:
    until = time.monotonic() + timeout
    while not done():
        if time.monotonic() > until:
            raise SystemExit(f"fleet: timed out waiting for {what}")
        time.sleep(SAMPLE_S)


def jobs_done(records: JobRecords, job_ids: Sequence[str]) -> bool:
    return all(records.status(j).state in ("finished", "partial", "failed") for j in job_ids)


def run_fleet(settings: Settings, n: int, episodes: list[Episode], *, seconds_per_token: float, work: Path,
              extra: list[Episode] | None = None, kill: int = 0, timeout: float = 900) -> dict:
    """A backfill of `episodes` drained by `n` drains; `extra`: an ingest job enqueued mid-run (priority);
    `kill`: drains SIGKILLed later in the run and replaced (faults). Fresh services state first."""
    fresh(settings)
    redis, db = redis_client(settings), mongo_database(settings)
    records = JobRecords(redis, db, settings.result_ttl)
    backfill = enqueue(settings, redis, db, episodes, "backfill")
    total = backfill.batches
    stats = work / f"stats-{n}"
    stats.mkdir(parents=True, exist_ok=True)
    drains = Drains(settings, stats, seconds_per_token)
    report: dict = {"n": n, "batches": total, "chunks": backfill.chunks}
    job_ids = [backfill.job_id]
    window = [math.ceil(WINDOW[0] * total), math.ceil(WINDOW[1] * total)]
    expected = total  # batches of every job enqueued so far
    snapshots: list[Snapshot] = []
    priority: dict = {}
    faults: dict = {}
    began = time.time()
    try:
        for i in range(n):
            drains.start(f"fleet-{n}-{i}")
        until = time.monotonic() + timeout
        # Only MongoDB is polled until the end: Redis' command counts are the fleet's.
        while True:
            stored = db.batches.count_documents({})
            if (stored >= expected and (faults.get("recovered_s") is not None if kill else True)
                    and jobs_done(records, job_ids)):
                break
            if time.monotonic() > until:
                raise SystemExit(f"fleet: N={n} did not finish in {timeout} s")
            if len(snapshots) < 2 and stored >= window[len(snapshots)]:
                snapshots.append(Snapshot.take(redis, db, drains))
            if extra and not priority and len(snapshots) == 2:
                job = enqueue(settings, redis, db, extra, "ingest")
                priority = {"job_id": job.job_id, "batches": job.batches, "enqueued_at": time.time()}
                job_ids.append(job.job_id)
                expected += job.batches
            ingest_stored = not extra or bool(priority) and db.batches.count_documents(
                {"job_id": priority["job_id"]}) == priority["batches"]
            if kill and not faults and stored >= KILL_AT * total and ingest_stored:
                faults = kill_and_replace(drains, redis, n, kill)
            if faults and "recovered_s" not in faults:
                recovered(redis, faults)
            time.sleep(SAMPLE_S)
    finally:
        drains.stop()
    ended = time.time()
    report["seconds"] = round(ended - began, 1)
    report.update(window_figures(snapshots, drains, ledger_times(db, job_id=backfill.job_id), window, n))
    # Over the whole run: a pass comes every maintenance interval, longer than the steady window. A drain's
    # first pass always runs (3 per drain, one per queue, at its start); the others are the fleet's.
    passes = [first for m in drains.meters() for _, first in m["passes"]]
    report["maintenance_passes_per_min"] = round(passes.count(False) * 60 / (ended - began), 2)
    report["maintenance_first_passes"] = passes.count(True)
    if priority:
        report["priority"] = priority_figures(db, priority, backfill.job_id, workers=n,
                                              prefetch=settings.prefetch_batches)
    if faults:
        report["faults"] = {**fault_figures(redis, db, records, job_ids), "killed": faults["killed"],
                            "held_by_killed": len(faults["held"]), "recovered_s": faults.get("recovered_s")}
    return report


def window_figures(snapshots: list[Snapshot], drains: Drains, entries: list[tuple[float, dict]],
                   window: list[int], n: int) -> dict:
    """Throughput from the ledger's timestamps between the window's first and last batch stored; per-batch
    costs from the counters sampled then. `compute_share`: the stand-in's wait over the `n` drains' time."""
    (t0, _), (t1, _) = entries[window[0] - 1], entries[window[1] - 1]
    inside = [doc for _, doc in entries[window[0]:window[1]]]
    a, b = snapshots[0], snapshots[-1]
    batches = max(b.batches - a.batches, 1)
    commands = {name: b.commands.get(name, 0) - a.commands.get(name, 0) for name in b.commands}
    commands.pop("info", None)  # this process' own sampling
    per_batch = {name: round(calls / batches, 2) for name, calls in sorted(commands.items(), key=lambda kv: -kv[1])
                 if calls}
    meters = drains.meters()
    takes = sorted(ms for m in meters for at, ms in m["takes"] if a.at <= at <= b.at)
    seconds = t1 - t0
    return {
        "window_batches": len(inside),
        "window_s": round(seconds, 2),
        "batches_per_s": round(len(inside) / seconds, 3) if seconds > 0 else None,
        "tokens_per_s": round(sum(d["n_tokens"] for d in inside) / seconds) if seconds > 0 else None,
        "compute_share": round(sum(d["gpu_seconds"] for d in inside) / (n * seconds), 3)
        if seconds > 0 else None,
        "redis_commands_per_batch": round(sum(commands.values()) / batches, 2),
        "redis_commands_per_batch_by_command": per_batch,
        "redis_cpu_s_per_1k_batches": round((b.redis_cpu_s - a.redis_cpu_s) * 1000 / batches, 2),
        "mongo_ops_per_batch": round((b.mongo_ops - a.mongo_ops) / batches, 2),
        "mongo_bytes_per_batch": round((b.mongo_bytes - a.mongo_bytes) / batches),
        "take_p50_ms": round(statistics.median(takes), 2) if takes else None,
        "take_p99_ms": round(takes[min(len(takes) - 1, math.ceil(0.99 * len(takes)) - 1)], 2) if takes else None,
        "client_cpu_ms_per_batch": round((b.client_cpu_s - a.client_cpu_s) * 1000 / batches, 1),
    }


def kill_and_replace(drains: Drains, redis: Redis, n: int, kill: int) -> dict:
    """SIGKILL `kill` drains, start as many others; what the killed ones held (registered as started)."""
    names = drains.alive()[:kill]
    at = time.time()
    drains.kill(names)
    for i in range(kill):
        drains.start(f"fleet-{n}-replacement-{i}")
    held = []
    for queue_name in (k.decode() for k in redis.keys("rq:wip:*")):
        for entry in redis.zrange(queue_name, 0, -1):
            job_id = entry.decode().split(":")[0]
            if (redis.hget(Job.key_for(job_id), "worker_name") or b"").decode() in names:
                held.append(job_id)
    return {"killed": len(names), "names": names, "held": sorted(set(held)), "at": at}


def recovered(redis: Redis, faults: dict) -> None:
    """Note when every batch the killed drains held was taken again by another drain (or stored)."""
    for job_id in faults["held"]:
        owner = (redis.hget(Job.key_for(job_id), "worker_name") or b"").decode()
        status = (redis.hget(Job.key_for(job_id), "status") or b"").decode()
        if owner in faults["names"] and status != "finished":
            return
    faults["recovered_s"] = round(time.time() - faults["at"], 1)


def priority_figures(db: Database, priority: dict, backfill_job: str, *, workers: int, prefetch: int) -> dict:
    """Backfill batches stored between the ingest's enqueue and its last batch stored, against the bound."""
    ingest_end = max(t for t, _ in ledger_times(db, job_id=priority["job_id"]))
    advanced = sum(priority["enqueued_at"] < t <= ingest_end for t, _ in ledger_times(db, job_id=backfill_job))
    return {"ingest_batches": priority["batches"], "advanced": advanced, "bound": workers * (prefetch + 3),
            "ingest_s": round(ingest_end - priority["enqueued_at"], 2)}


def fault_figures(redis: Redis, db: Database, records: JobRecords, job_ids: list[str]) -> dict:
    """Every chunk one vector, every batch one ledger entry, every job's counters exact."""
    lost = ledger_missing = ledger_duplicated = 0
    exact = True
    for job_id in job_ids:
        batch_ids = records.batch_ids(job_id)
        chunk_ids = [c for b in Job.fetch_many(batch_ids, connection=redis, serializer=JSONSerializer)
                     for c in b.args[0]["chunk_ids"]]
        found = audit(db, job_id, chunk_ids, batch_ids)
        lost += found.lost
        ledger_missing += found.ledger_missing
        ledger_duplicated += found.ledger_duplicated
        exact = exact and counters_exact(records.status(job_id))
    # Over the whole database, once (`audit` counts vectors of every job's chunks in it).
    chunk_ids = [d["chunk_id"] for d in db.embeddings.find({}, {"chunk_id": 1})]
    duplicated = len(chunk_ids) - len(set(chunk_ids))
    return {"lost": lost, "duplicated": duplicated, "ledger_missing": ledger_missing,
            "ledger_duplicated": ledger_duplicated, "counters_add_up": exact}


@dataclass(frozen=True)
class LauncherSim:
    max_containers: int
    drain_budget_s: int
    period_s: float
    cold_start_s: float
    nightly_share: float = 0.25  # the nightly job joins after this share of the backfill's ideal time


def run_launcher(settings: Settings, backlog: list[Episode], nightly: list[Episode], sim: LauncherSim, *,
                 seconds_per_token: float, work: Path, timeout: float = 900) -> dict:
    """The launcher's real plan every `period_s`, spawning stand-in drains that start `cold_start_s` later.

    The ideal time is the compute the batches took (the ledger's) over `max_containers`."""
    fresh(settings)
    redis, db = redis_client(settings), mongo_database(settings)
    records = JobRecords(redis, db, settings.result_ttl)
    modal = ModalSettings(max_containers=sim.max_containers, drain_budget_s=sim.drain_budget_s,
                          launcher_period_s=math.ceil(sim.period_s), cold_start_grace_s=int(10 * sim.cold_start_s) + 60)
    first = enqueue(settings, redis, db, backlog, "backfill")
    job_ids = [first.job_id]
    nightly_at_s = sim.nightly_share * first.tokens * seconds_per_token / sim.max_containers
    stats = work / "stats-launcher"
    stats.mkdir(parents=True, exist_ok=True)
    drains = Drains(settings, stats, seconds_per_token)
    timers: list[threading.Timer] = []
    spawned: list[float] = []

    def spawn(budget_s: float, spawn_id: str) -> str:
        name = f"launched-{len(spawned)}"
        spawned.append(time.time())
        timer = threading.Timer(sim.cold_start_s, drains.start, args=(name,),
                                kwargs={"burst": True, "budget_s": budget_s, "spawn_id": spawn_id})
        timer.start()
        timers.append(timer)
        return name

    timeline: list[tuple[float, int, int]] = []  # (seconds, batches waiting or held, containers running)
    plans: list[dict] = []
    began = time.time()
    next_plan = began
    nightly_jobs: list[EnqueuedJob] = []  # the producer runs beside the launcher, as the nightly cron's does
    producer = threading.Timer(nightly_at_s, lambda: nightly_jobs.append(
        enqueue(settings, redis_client(settings), mongo_database(settings), nightly, "nightly")))
    producer.start()
    try:
        while True:
            now = time.time()
            if now - began > timeout:
                raise SystemExit(f"fleet: the launcher's backlog was not empty after {timeout} s")
            if now >= next_plan:
                plan = plan_launch(settings, modal, redis, db)
                launch(plan, spawn, SpawnLedger(redis, settings.queue_name))
                plans.append({"at_s": round(now - began, 1), "backlog": plan.backlog.batches, "running": plan.running,
                              "cold": plan.cold, "drains": plan.drains})
                next_plan = now + sim.period_s
            total = first.batches + sum(j.batches for j in nightly_jobs)
            stored = db.batches.count_documents({})
            timeline.append((now - began, total - stored, len(drains.alive())))
            if nightly_jobs and stored >= total and jobs_done(records, [*job_ids, nightly_jobs[0].job_id]):
                break
            time.sleep(SAMPLE_S)
        emptied = time.time() - began
    finally:
        producer.cancel()
        for timer in timers:
            timer.cancel()
        drains.stop()
    entries = ledger_times(db)
    busy = {}
    for _, doc in entries:
        busy[doc["worker"]] = busy.get(doc["worker"], 0.0) + doc["gpu_seconds"]
    billed = sum(drains.ended[name] - drains.started[name] for name in drains.processes)
    # Each drain's start (process start to its first batch started) and end (its last batch stored to its exit).
    starts = {d["worker"]: _unix(d["started_at"]) for d in db.batches.find({}, {"worker": 1, "started_at": 1})
              .sort("started_at", -1)}
    ends = {doc["worker"]: at for at, doc in entries}
    ideal = sum(busy.values()) / sim.max_containers
    return {
        "max_containers": sim.max_containers,
        "drain_budget_s": sim.drain_budget_s,
        "launcher_period_s": sim.period_s,
        "cold_start_s": sim.cold_start_s,
        "nightly_joins_at_s": round(nightly_at_s, 1),
        "batches": total,
        "time_to_empty_s": round(emptied, 1),
        "ideal_s": round(ideal, 1),
        "time_to_empty_vs_ideal": round(emptied / ideal, 3),
        "billed_container_s": round(billed, 1),
        "idle_share": round(1 - sum(busy.values()) / billed, 3) if billed else None,
        "idle_at_start_s": round(sum(starts[n] - drains.started[n] for n in drains.processes if n in starts), 1),
        "idle_at_end_s": round(sum(drains.ended[n] - ends[n] for n in drains.processes if n in ends), 1),
        "drains_without_batches": sum(n not in ends for n in drains.processes),
        "max_running": max(r for _, _, r in timeline),
        "over_spawn": max(0, max(r for _, _, r in timeline) - sim.max_containers),
        "spawns": len(spawned),
        "plans": plans,
        "timeline": timeline,
    }


def plot(launcher: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = [t for t, _, _ in launcher["timeline"]]
    fig, left = plt.subplots(figsize=(8, 4))
    left.plot(seconds, [b for _, b, _ in launcher["timeline"]], color="tab:blue", label="batches not stored")
    left.set_xlabel("seconds")
    left.set_ylabel("batches not stored", color="tab:blue")
    right = left.twinx()
    right.step(seconds, [r for _, _, r in launcher["timeline"]], color="tab:orange", where="post",
               label="drains running")
    right.axhline(launcher["max_containers"], color="tab:red", linestyle=":", label="max_containers")
    right.set_ylabel("drains running", color="tab:orange")
    right.set_ylim(0, launcher["max_containers"] + 2)
    left.axvline(launcher["nightly_joins_at_s"], color="grey", linestyle="--")
    left.set_title("make fleet: the launcher simulated (stand-in model), backlog and containers")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def catalog(work: Path, batches: int, settings: Settings) -> list[Episode]:
    """Enough marked copies of the vendored episodes for `batches` full batches, parsed."""
    episodes_needed = math.ceil(batches * settings.batch_max_chunks / CHUNKS_PER_EPISODE)
    copies = math.ceil(episodes_needed / 120)
    build_catalog(work / "catalog", copies)
    episodes, refused = parse_files(sorted((work / "catalog").rglob("*.vtt")))
    if refused:
        raise SystemExit(f"fleet: catalog files refused: {refused[:3]}")
    return episodes


def episodes_for(episodes: list[Episode], batches: int, settings: Settings, *, offset: int = 0) -> list[Episode]:
    count = max(1, math.ceil(batches * settings.batch_max_chunks / CHUNKS_PER_EPISODE))
    return episodes[offset:offset + count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", default="1,4,16,64", help="drain counts, comma-separated")
    parser.add_argument("--batches-per-drain", default="10,8,6,4",
                        help="backlog per drain for each fleet size (the N = 16 run also kills and recovers)")
    parser.add_argument("--compute-s", type=float, default=None,
                        help="model seconds per full batch (default: batch_max_tokens at "
                             "PODEMBED_DEFAULT_TOKENS_PER_SECOND, the A10G figure the launcher plans with)")
    parser.add_argument("--time-scale", type=float, default=3.0,
                        help="multiplies the compute wait of the fleet runs (3: up to 64 drains leave this 2-core "
                             "host's CPU to the control plane)")
    parser.add_argument("--launcher-time-scale", type=float, default=3.0,
                        help="multiplies the compute wait of the launcher's drains (3, as the fleet runs: at 1 eight "
                             "drains on this loaded 2-core host wait on its CPU, not on the stand-in)")
    parser.add_argument("--max-containers", type=int, default=8)
    parser.add_argument("--launcher-period", type=float, default=5.0, help="seconds between launcher plans")
    parser.add_argument("--cold-start", type=float, default=5.0, help="seconds from a spawn to its drain's start")
    parser.add_argument("--drain-budget", type=int, default=180,
                        help="each launched drain's time budget, seconds (180: about 20 batches at "
                             "--launcher-time-scale 3, as 60 s held at 1)")
    parser.add_argument("--launcher-batches", type=int, default=96, help="backfill batches before the nightly")
    parser.add_argument("--nightly-batches", type=int, default=16)
    parser.add_argument("--launcher-only", action="store_true",
                        help="only the launcher's simulation (no fleet runs, no faults or priority)")
    parser.add_argument("--out", type=Path, default=ROOT / ".podembed" / "fleet")
    args = parser.parse_args()
    sizes = [] if args.launcher_only else [int(n) for n in args.fleet.split(",")]
    per_drain = [] if args.launcher_only else [int(b) for b in args.batches_per_drain.split(",")]
    if len(per_drain) != len(sizes):
        raise SystemExit("fleet: --batches-per-drain needs one figure per --fleet size")
    # A ping may wait on nx-27017 for longer than the 5 s default while 64 drains write on a loaded 2-core host.
    settings = Settings.from_env()
    settings = settings.replace(first_contact_seconds=max(settings.first_contact_seconds, 30.0))
    compute_s = args.compute_s or settings.batch_max_tokens / settings.default_tokens_per_second
    seconds_per_token = compute_s * args.time_scale / settings.batch_max_tokens
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    began = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        largest = max([n * b for n, b in zip(sizes, per_drain, strict=True)]
                      + [args.launcher_batches + args.nightly_batches])
        episodes = catalog(work, largest + 6, settings)
        settings = on_spare_ports(settings, work / "services")
        services_up(settings)
        try:
            runs = []
            for n, b in zip(sizes, per_drain, strict=True):
                chosen = episodes_for(episodes, n * b, settings)
                at_16 = n == 16
                runs.append(run_fleet(settings, n, chosen, seconds_per_token=seconds_per_token, work=work,
                                      extra=episodes[-5:] if at_16 else None, kill=n // 4 if at_16 else 0))
                print(f"fleet: N={n} done in {runs[-1]['seconds']} s", file=sys.stderr)
            # By tokens: the batches of a short backlog are smaller (more of them end an episode's window).
            one = runs[0]["tokens_per_s"] if sizes[:1] == [1] else None
            for run in runs:
                run["efficiency"] = round(run["tokens_per_s"] / (run["n"] * one), 3) if one else None
            sim = LauncherSim(max_containers=args.max_containers, drain_budget_s=args.drain_budget,
                              period_s=args.launcher_period, cold_start_s=args.cold_start)
            launcher = run_launcher(
                settings, episodes_for(episodes, args.launcher_batches, settings),
                episodes_for(episodes, args.nightly_batches, settings, offset=len(episodes) // 2), sim,
                seconds_per_token=compute_s * args.launcher_time_scale / settings.batch_max_tokens, work=work)
        finally:
            services_down(settings)
    at_16 = next((r for r in runs if r["n"] == 16), None)
    plot(launcher, args.out / "fleet.png")
    report = {
        "simulation": "control plane only: real Redis, nx-27017, producer, drains, launcher plan; the model is a "
                      "stand-in that waits the batch's compute time and returns deterministic 768-d unit vectors",
        "compute_s_per_full_batch": round(compute_s, 3),
        "time_scale": args.time_scale,
        "launcher_time_scale": args.launcher_time_scale,
        "batch_max_chunks": settings.batch_max_chunks,
        "batch_max_tokens": settings.batch_max_tokens,
        "prefetch_batches": settings.prefetch_batches,
        "heartbeat_interval_s": settings.heartbeat_interval,
        "maintenance_interval_s": settings.maintenance_interval,
        "host": {"cpus": os.cpu_count(), "load_before": [round(x, 2) for x in load_before],
                 "load_after": [round(x, 2) for x in os.getloadavg()]},
        "runs": [{k: v for k, v in r.items() if k not in ("priority", "faults")} for r in runs],
        "faults": at_16.get("faults") if at_16 else None,
        "priority": at_16.get("priority") if at_16 else None,
        "launcher": {k: v for k, v in launcher.items() if k != "timeline"},
        "plot": str(args.out / "fleet.png"),
        "seconds": round(time.time() - began, 1),
    }
    text = json.dumps(report, indent=2)
    (args.out / "fleet.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
