"""The records that flow from transcript to stored vector."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    speaker: str | None
    text: str


@dataclass
class Episode:
    episode_id: str
    podcast: str | None
    published_at: str | None
    segments: list[Segment]
    source: str = ""

    def content_sha256(self) -> str:
        """Hash of what chunking reads, so a changed transcript is seen as changed."""
        payload = json.dumps([[s.start, s.end, s.speaker, s.text] for s in self.segments])
        return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    episode_id: str
    podcast: str | None
    seq: int
    start: float
    end: float
    speakers: list[str]
    text: str
    n_tokens: int

    @property
    def text_sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


@dataclass(frozen=True)
class VectorSpec:
    """Everything that changes a vector; two chunks with equal text and spec share one vector."""

    model: str
    revision: str | None
    instruction: str
    pool_instruction: bool
    normalize: bool

    @property
    def key(self) -> str:
        payload = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def weights(self) -> tuple[str, str | None, bool]:
        """What a worker must hold to embed under this spec: model, revision and pooling."""
        return (self.model, self.revision, self.pool_instruction)

    def embedding_id(self, chunk_id: str) -> str:
        """`_id` of a chunk's vector document: one per chunk and vector key."""
        return f"{chunk_id}|{self.key}"


@dataclass
class Batch:
    """One RQ job: many chunks of one user-facing job, embedded with one spec."""

    job_id: str
    batch_id: str
    spec: VectorSpec
    chunks: list[Chunk] = field(default_factory=list)
    # Embed again even where a vector for this text and spec is stored (`backfill --force`).
    force: bool = False

    @property
    def n_tokens(self) -> int:
        return sum(c.n_tokens for c in self.chunks)

    def to_payload(self) -> dict[str, Any]:
        """A JSON-ready dict (RQ jobs use the JSON serializer)."""
        return asdict(self)

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Batch:
        return cls(
            job_id=payload["job_id"],
            batch_id=payload["batch_id"],
            spec=VectorSpec(**payload["spec"]),
            chunks=[Chunk(**c) for c in payload["chunks"]],
            force=payload.get("force", False),
        )
