"""What embedding costs, from measurements: busy seconds (batch compute) against billed seconds.

A GPU container is billed from its start to its exit: cold start, queue waits and the
idle `scaledown_window` included. The ledger's `gpu_seconds` (busy) is only the compute,
so $/1M chunks on busy seconds is the floor and on billed seconds what was paid.
The numbers come from MongoDB `workers` (one document per container, a small collection)
and, for one job, from the ledger entries of its batches (read by `_id`).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass

from pymongo.database import Database
from pymongo.errors import PyMongoError

from config.errors import StoreError

MILLION = 1_000_000


@dataclass
class CostRow:
    """Containers of one GPU type and model, added up."""

    gpu: str
    device: str
    model: str
    containers: int
    from_snapshot: int
    cold_start_median_s: float
    cold_start_snapshot_median_s: float | None
    embedded: int
    skipped: int
    busy_seconds: float
    billed_seconds: float
    busy_usd: float
    billed_usd: float

    @property
    def utilization(self) -> float:
        return self.busy_seconds / self.billed_seconds if self.billed_seconds else 0.0

    @property
    def usd_per_million_busy(self) -> float | None:
        return self.busy_usd / self.embedded * MILLION if self.embedded else None

    @property
    def usd_per_million_billed(self) -> float | None:
        return self.billed_usd / self.embedded * MILLION if self.embedded else None

    def to_dict(self) -> dict:
        return {**asdict(self), "utilization": self.utilization, "usd_per_million_chunks_busy":
                self.usd_per_million_busy, "usd_per_million_chunks_billed": self.usd_per_million_billed}


def measured_costs(db: Database) -> list[CostRow]:
    """One row per (GPU type, device, model) over every container in `workers`."""
    try:
        docs = list(db.workers.find({}))
    except PyMongoError as exc:
        raise StoreError(f"cannot read {db.name}.workers: {exc}") from exc
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for doc in docs:
        groups[(doc["gpu"], doc["device"], doc["model"])].append(doc)
    rows = []
    for (gpu, device, model), group in sorted(groups.items()):
        restored = [d["cold_start_seconds"] for d in group if d["from_snapshot"]]
        rows.append(CostRow(
            gpu=gpu, device=device, model=model, containers=len(group), from_snapshot=len(restored),
            cold_start_median_s=statistics.median(d["cold_start_seconds"] for d in group),
            cold_start_snapshot_median_s=statistics.median(restored) if restored else None,
            embedded=sum(d["embedded"] for d in group),
            skipped=sum(d["skipped"] for d in group),
            busy_seconds=sum(d["busy_seconds"] for d in group),
            billed_seconds=sum(d["billed_seconds"] for d in group),
            busy_usd=sum(d["busy_seconds"] * d["gpu_price_per_hour"] / 3600 for d in group),
            billed_usd=sum(d["billed_seconds"] * d["gpu_price_per_hour"] / 3600 for d in group),
        ))
    return rows


def cost_table(rows: list[CostRow]) -> str:
    """The README's cost table, as Markdown, from measured rows."""
    lines = [
        "| GPU | model | containers (from snapshot) | cold start median, s (from snapshot) | embedded chunks "
        "| busy s | billed s | busy/billed | $ per 1M chunks, busy | $ per 1M chunks, billed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        snapshot = "-" if r.cold_start_snapshot_median_s is None else f"{r.cold_start_snapshot_median_s:.1f}"
        lines.append(
            f"| {r.gpu} ({r.device}) | {r.model} | {r.containers} ({r.from_snapshot}) "
            f"| {r.cold_start_median_s:.1f} ({snapshot}) | {r.embedded:,} | {r.busy_seconds:.1f} "
            f"| {r.billed_seconds:.1f} | {r.utilization:.0%} | {_usd(r.usd_per_million_busy)} "
            f"| {_usd(r.usd_per_million_billed)} |"
        )
    return "\n".join(lines)


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:.2f}"


@dataclass
class JobCost:
    """One job's compute, and its share of what the containers that ran it were billed."""

    job_id: str
    batches: int
    busy_seconds: float
    busy_usd: float
    # Each container's billed seconds, split between jobs in proportion to their busy seconds.
    billed_seconds: float
    billed_usd: float
    # Busy seconds on workers without a `workers` record (a local `podembed work`): not billed here.
    unaccounted_busy_seconds: float

    @property
    def busy_share(self) -> float:
        return self.busy_seconds / self.billed_seconds if self.billed_seconds else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "busy_share": self.busy_share}


def job_cost(db: Database, job_id: str, batch_ids: list[str]) -> JobCost:
    """Cost of a job from the ledger entries of `batch_ids` (all of the job's entries if empty)."""
    query = {"_id": {"$in": batch_ids}} if batch_ids else {"job_id": job_id}
    try:
        ledger = list(db.batches.find(query, {"gpu_seconds": 1, "cost_usd": 1, "worker": 1}))
        per_worker: dict[str, float] = defaultdict(float)
        for entry in ledger:
            per_worker[entry["worker"]] += entry["gpu_seconds"]
        workers = {d["_id"]: d for d in db.workers.find({"_id": {"$in": list(per_worker)}},
                                                        {"busy_seconds": 1, "billed_seconds": 1,
                                                         "gpu_price_per_hour": 1})}
    except PyMongoError as exc:
        raise StoreError(f"cannot read the cost of job {job_id}: {exc}") from exc
    billed = billed_usd = unaccounted = 0.0
    for name, busy in per_worker.items():
        w = workers.get(name)
        if w is None or w["busy_seconds"] <= 0:
            unaccounted += busy
            continue
        share = busy / w["busy_seconds"] * w["billed_seconds"]
        billed += share
        billed_usd += share * w["gpu_price_per_hour"] / 3600
    return JobCost(
        job_id=job_id, batches=len(ledger), busy_seconds=sum(per_worker.values()),
        busy_usd=sum(e["cost_usd"] for e in ledger), billed_seconds=billed, billed_usd=billed_usd,
        unaccounted_busy_seconds=unaccounted,
    )
