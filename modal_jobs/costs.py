"""What embedding costs, from measurements: busy seconds (batch compute) against billed seconds.

A GPU container is billed from its start to its exit: cold start, queue waits and the
idle `scaledown_window` included, and for its reserved CPU cores and memory on top of the GPU.
The ledger's `gpu_seconds` (busy) is only the compute at the GPU's price, so $/1M chunks on busy
seconds is the floor and on billed seconds what was paid (at least: Modal bills the higher of
the reserved and the used CPU and memory, https://modal.com/docs/guide/resources).
The numbers come from MongoDB `workers` (one document per container, a small collection)
and, for one job, from the ledger entries of its batches (read by `_id`).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

from pymongo.database import Database
from pymongo.errors import PyMongoError

from config.errors import PodembedError, StoreError

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
    # Containers that never recorded an exit and stopped beating: killed (preempted, OOM, timed out);
    # their billed seconds end at their last heartbeat.
    lost: int = 0

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


def measured_costs(db: Database, *, heartbeat_interval: float = 10.0, now: datetime | None = None) -> list[CostRow]:
    """One row per (GPU type, device, model) over every container in `workers`."""
    now = now or datetime.now(UTC)
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
            busy_usd=sum(d["busy_seconds"] * d["price_per_hour"] / 3600 for d in group),
            billed_usd=sum(d["billed_seconds"] * d["billed_price_per_hour"] / 3600 for d in group),
            lost=sum(1 for d in group if _lost(d, heartbeat_interval, now)),
        ))
    return rows


def _lost(doc: dict, heartbeat_interval: float, now: datetime) -> bool:
    if doc.get("exited_at") is not None:
        return False
    return (now - doc["updated_at"]).total_seconds() > 3 * heartbeat_interval


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
                                                         "billed_price_per_hour": 1})}
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
        billed_usd += share * w["billed_price_per_hour"] / 3600
    return JobCost(
        job_id=job_id, batches=len(ledger), busy_seconds=sum(per_worker.values()),
        busy_usd=sum(e["cost_usd"] for e in ledger), billed_seconds=billed, billed_usd=billed_usd,
        unaccounted_busy_seconds=unaccounted,
    )


@dataclass
class Reconciliation:
    """Our billed figure against Modal's billing report for the same app and window."""

    app: str
    start: datetime  # the first container's start, rounded down to the hour (the report's resolution)
    end: datetime  # the last heartbeat or exit
    containers: int
    our_billed_usd: float  # the containers' lives: GPU, reserved CPU cores and memory; no other functions
    modal_usd: float  # every resource of the app's objects in the report's hours
    modal_by_resource: dict[str, float]

    @property
    def difference_usd(self) -> float:
        return self.modal_usd - self.our_billed_usd

    def to_dict(self) -> dict:
        return {**asdict(self), "start": self.start.isoformat(), "end": self.end.isoformat(),
                "difference_usd": self.difference_usd}


def billed_window(db: Database) -> tuple[datetime, datetime, int, float]:
    """(first start, last heartbeat or exit, containers, our billed USD) over `workers`."""
    try:
        docs = list(db.workers.find({}, {"started_at": 1, "updated_at": 1, "billed_seconds": 1,
                                         "billed_price_per_hour": 1}))
    except PyMongoError as exc:
        raise StoreError(f"cannot read {db.name}.workers: {exc}") from exc
    if not docs:
        raise PodembedError("nothing to reconcile: MongoDB `workers` has no container (drain on Modal first)")
    # In UTC by `datetime.UTC`: modal refuses pymongo's own UTC tzinfo.
    start = min(d["started_at"] for d in docs).astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    end = max(d["updated_at"] for d in docs).astimezone(UTC)
    return start, end, len(docs), sum(d["billed_seconds"] * d["billed_price_per_hour"] / 3600 for d in docs)


def reconcile(db: Database, app: str, report: Callable[[datetime, datetime], Iterable]) -> Reconciliation:
    """Compare with `report(start, end)`: Modal's billing report items (`modal.billing.BillingReportItem`)."""
    start, end, containers, ours = billed_window(db)
    by_resource: dict[str, float] = defaultdict(float)
    total = 0.0
    for item in report(start, end):
        if app not in (item.description, item.tags.get("app", "")):
            continue
        total += float(item.cost)
        for resource, cost in item.cost_by_resource.items():
            by_resource[resource] += float(cost)
    return Reconciliation(app=app, start=start, end=end, containers=containers, our_billed_usd=ours,
                          modal_usd=total, modal_by_resource=dict(by_resource))


def modal_billing_report(start: datetime, end: datetime) -> list:
    """The workspace's hourly billing report (modal 1.6); needs Modal credentials allowed to read it."""
    import modal
    from modal.exception import Error as ModalError

    # A report ends at an hour: partial final intervals are left out of it.
    end = end.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    try:
        return modal.Workspace.from_context().billing.report(start=start, end=end, resolution="h")
    except ModalError as exc:
        raise billing_refused(exc) from exc


def billing_refused(exc: Exception) -> PodembedError:
    """The one-line error for a billing report Modal refused: the plan, or the credentials."""
    from modal.exception import AuthError, PermissionDeniedError

    reason = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, PermissionDeniedError):
        # Modal's billing API reference does not name the plans it serves; it is reported as a Team and
        # Enterprise feature (not confirmed from the stored docs).
        return PodembedError(f"Modal refused this workspace's billing report ({reason}): it needs a Team or "
                             "Enterprise plan; on other plans compare with the dashboard's usage page instead")
    if isinstance(exc, AuthError):
        return PodembedError(f"Modal refused the credentials ({reason}): `modal token new`, or MODAL_TOKEN_ID "
                             "and MODAL_TOKEN_SECRET of the workspace")
    return PodembedError(f"Modal's billing report is not available here ({reason}); reconciling needs "
                         "credentials of the workspace and a Team or Enterprise plan")
