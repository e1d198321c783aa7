"""A job as its status document shows it: its state, its counts, the webhook of its end.

`producer.jobs` reads these from Redis and MongoDB; the CLI, the HTTP API, the dashboard, the
operations and the watermark read the states and their ended and undone sets from `JobState`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum, nonmember
from typing import Any

from config.settings import redact_url


class JobState(StrEnum):
    """A job's state, as its status document spells it."""

    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    PARTIAL = "partial"  # some batches failed for good
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"  # its producer stopped short: what it enqueued runs, the rest never will

    # States after which a job's counts no longer change (but for batches running when it was cancelled);
    # an `interrupted` job's change until what it enqueued has run (`JobStatus.ended`).
    ENDED = nonmember(frozenset({FINISHED, PARTIAL, FAILED, CANCELLED}))
    # Ended states that left some of the job's episodes unembedded.
    UNDONE = nonmember(frozenset({PARTIAL, FAILED, CANCELLED}))


@dataclass
class ChunkCounts:
    total: int = 0
    embedded: int = 0
    skipped: int = 0
    failed: int = 0
    cancelled: int = 0
    pending: int = 0
    # Of the pending chunks, those that running batches have embedded so far (per forward pass).
    in_progress: int = 0


@dataclass
class BatchCounts:
    total: int = 0
    queued: int = 0
    running: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0


@dataclass
class NotifyStatus:
    """Where the job's end is POSTed, and how that went: `waiting` (for the end), `sending`, `sent`, `failed`."""

    url: str  # with its secrets hidden
    state: str = "waiting"
    attempts: int = 0
    error: str | None = None


@dataclass
class JobStatus:
    """The status document of DESIGN.md (`status --json`, `GET /jobs/{id}`)."""

    job_id: str
    kind: str
    state: JobState
    created_at: str
    finished_at: str | None
    model: str
    instruction: str
    episodes: int
    chunks: ChunkCounts
    batches: BatchCounts
    gpu_seconds: float
    cost_usd: float
    device: str
    errors: dict[str, str] = field(default_factory=dict)
    # False while the producer still adds batches (totals grow until then).
    enqueue_done: bool = True
    # The RQ queue of its batches (None: a job recorded before there was one queue per kind).
    queue: str | None = None
    # The webhook of its end (None: none was asked for).
    notify: NotifyStatus | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def ended(self) -> bool:
        """Whether its counts no longer change: an ended state, or interrupted with nothing left queued or running."""
        return self.state in JobState.ENDED or (self.state is JobState.INTERRUPTED and not self.batches.queued
                                                and not self.batches.running)


def notify_status(rec: dict[str, str]) -> NotifyStatus | None:
    if not rec.get("notify_url"):
        return None
    return NotifyStatus(url=redact_url(rec["notify_url"]), state=rec.get("notify_state", "waiting"),
                        attempts=int(rec.get("notify_attempts", 0)), error=rec.get("notify_error"))


def job_state(batches: BatchCounts, *, cancelled: bool, enqueue_done: bool = True, producing: bool = False) -> JobState:
    if cancelled:
        return JobState.CANCELLED
    if not enqueue_done:
        if not producing:
            return JobState.INTERRUPTED
        return JobState.RUNNING if batches.running or batches.finished or batches.failed else JobState.QUEUED
    if batches.finished == batches.total:
        return JobState.FINISHED
    if batches.finished + batches.failed == batches.total:
        return JobState.PARTIAL if batches.finished else JobState.FAILED
    if batches.running or batches.finished or batches.failed:
        return JobState.RUNNING
    return JobState.QUEUED
