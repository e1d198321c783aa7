"""Real worker processes, and the audit that nothing was lost or duplicated (the suite and `make soak`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pymongo.database import Database

from config.services import on_spare_ports, services_down, services_up
from config.settings import Settings
from producer.job_status import JobStatus

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")



@dataclass
class WorkerProcess:
    """`podembed work` in its own process group (its rq scheduler is a child: killed with it)."""

    process: subprocess.Popen
    log: Path

    def kill(self) -> None:
        """SIGKILL the worker and its children at once, as a lost machine or container would."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        """Warm shutdown (SIGTERM); SIGKILL if it has not ended 30 s later."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        # The scheduler child may outlive a worker that ended on its own.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def memory_kb(self) -> tuple[int, int]:
        """(resident, peak resident) in KiB, from /proc."""
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def worker_env(redis_url: str, mongo_uri: str, mongo_db: str, **settings: object) -> dict[str, str]:
    """The environment of a worker process: the services, and `PODEMBED_*` for each of `settings`."""
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PODEMBED_REDIS_URL": redis_url,
           "PODEMBED_MONGO_URI": mongo_uri, "PODEMBED_MONGO_DB": mongo_db}
    for name, value in settings.items():
        env[f"PODEMBED_{name.upper()}"] = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return env


def start_worker(env: dict[str, str], log: Path, *, burst: bool = False) -> WorkerProcess:
    with log.open("ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "worker.cli", "work", *(["--burst"] if burst else [])],
                                   cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return WorkerProcess(process, log)


def run_cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`podembed ARGS` in a fresh process with exactly `env`; output captured as text."""
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def wait_until(
    predicate: Callable[[], bool], *, timeout: float, what: str | Callable[[], str], interval: float = 0.05
) -> float:
    """Seconds until `predicate()` held; TimeoutError naming `what` (or what it returns then) if not in time."""
    began = time.monotonic()
    while not predicate():
        if time.monotonic() - began > timeout:
            raise TimeoutError(f"{what() if callable(what) else what}: not within {timeout:.0f} s")
        time.sleep(interval)
    return time.monotonic() - began


def wait_until_value(
    value: Callable[[], T | None], *, timeout: float, what: str | Callable[[], str], interval: float = 0.05
) -> T:
    """The first value `value()` returns that is not None; TimeoutError naming `what` if none in time."""
    found: list[T] = []

    def got() -> bool:
        v = value()
        if v is not None:
            found.append(v)
        return bool(found)

    wait_until(got, timeout=timeout, what=what, interval=interval)
    return found[0]


@dataclass
class Audit:
    """What the store and the ledger hold for one job, against what was enqueued."""

    chunks: int
    vectors: int
    lost: int  # chunks with no vector
    duplicated: int  # vectors beyond one per chunk (and vectors of chunks never enqueued)
    ledger_entries: int
    ledger_missing: int
    ledger_duplicated: int

    @property
    def exact(self) -> bool:
        return not (self.lost or self.duplicated or self.ledger_missing or self.ledger_duplicated)


def audit(db: Database, job_id: str, chunk_ids: list[str], batch_ids: list[str]) -> Audit:
    """Count vectors per chunk (in the whole database) and ledger entries per batch of the job."""
    per_chunk = Counter(doc["chunk_id"] for doc in db.embeddings.find({}, {"chunk_id": 1}))
    per_batch = Counter(doc["batch_id"] for doc in db.batches.find({"job_id": job_id}, {"batch_id": 1}))
    chunks, batches = set(chunk_ids), set(batch_ids)
    return Audit(
        chunks=len(chunks),
        vectors=sum(per_chunk.values()),
        lost=len(chunks - set(per_chunk)),
        duplicated=sum(n - 1 for n in per_chunk.values()) + sum(n for c, n in per_chunk.items() if c not in chunks),
        ledger_entries=sum(per_batch.values()),
        ledger_missing=len(batches - set(per_batch)),
        ledger_duplicated=sum(n - 1 for n in per_batch.values()) + sum(n for b, n in per_batch.items()
                                                                      if b not in batches),
    )


def counters_exact(status: JobStatus) -> bool:
    """A finished job counts every chunk and batch once: nothing pending, failed or counted twice."""
    c, b = status.chunks, status.batches
    return (status.state == "finished" and c.embedded + c.skipped == c.total and c.failed == c.pending == 0
            and b.finished == b.total and b.failed == b.running == b.queued == 0)


def run_alone(command: str, drill: Callable[[Settings, Path], dict]) -> None:
    """A drill of `make soak` on its own: its own services on spare ports and a temporary folder
    (given to `drill`), one JSON document on stdout."""
    with tempfile.TemporaryDirectory(prefix="podembed-drill-") as tmp:
        settings = on_spare_ports(Settings.from_env(), Path(tmp) / "services")
        services_up(settings)
        try:
            report = drill(settings, Path(tmp) / "inputs")
        finally:
            services_down(settings)
    print(json.dumps({"command": command, **report, "cpus": os.cpu_count()}, indent=2))
