"""The records that flow from transcript to stored vector."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

# What `podcast_key` keeps of a podcast's name to stay readable in ids.
_SLUG_CHARS = re.compile(r"[^a-z0-9]+")
# The podcast part of an id when the episode names no podcast.
NO_PODCAST = "_"


def podcast_key(podcast: str | None) -> str:
    """The podcast's part of every id: a readable slug plus a hash of the exact name.

    The hash keeps names that slug alike ("Show A", "show-a") apart; the key never holds '/'.
    """
    if podcast is None:
        return NO_PODCAST
    slug = _SLUG_CHARS.sub("-", podcast.lower()).strip("-")[:40]
    return f"{slug}.{hashlib.sha256(podcast.encode()).hexdigest()[:8]}"


def episode_key(podcast: str | None, episode_id: str) -> str:
    """An episode's identity: its own id within its podcast (two shows may both have an `E01`)."""
    return f"{podcast_key(podcast)}/{episode_id}"


def embedding_id(chunk_id: str, vector_key: str) -> str:
    """`_id` of a chunk's vector document: one per chunk and vector key."""
    return f"{chunk_id}|{vector_key}"


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

    @property
    def key(self) -> str:
        return episode_key(self.podcast, self.episode_id)

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
    def episode_key(self) -> str:
        return episode_key(self.podcast, self.episode_id)

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

    def embedding_id(self, chunk_id: str) -> str:
        return embedding_id(chunk_id, self.key)


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
