"""The records that flow from transcript to stored vector."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any

from config.errors import PayloadError, TranscriptFormatError
from config.settings import VECTOR_DTYPES

# What `podcast_key` keeps of a podcast's name to stay readable in ids.
_SLUG_CHARS = re.compile(r"[^a-z0-9]+")
# Hex digits of the name's SHA-256 in `podcast_key`: 64 bits, so finding a name whose key is another
# show's takes about 2**64 tries, not the 2**32 of the 8 digits that ids had before `podembed migrate`.
KEY_HASH_DIGITS = 16
# The podcast part of an id when the episode names no podcast.
NO_PODCAST = "_"
# Podcasts, episode ids and file names are logged, printed and stored: no control characters (C0, DEL, C1),
# line or paragraph separators or bidirectional overrides, and a bounded length.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
MAX_LABEL_CHARS = 500


def normal_podcast(podcast: str | None) -> str | None:
    """The podcast's name as stored: NFC, so "Café" typed with a combining accent is the same show."""
    return None if podcast is None else unicodedata.normalize("NFC", podcast)


def check_label(value: str, what: str) -> None:
    """A TranscriptFormatError naming `what` when `value` holds a control character or is too long."""
    bad = _CONTROL.search(value)
    if bad:
        raise TranscriptFormatError(f"{what} {value[:80]!r}: holds the control character U+{ord(bad[0]):04X}")
    if len(value) > MAX_LABEL_CHARS:
        raise TranscriptFormatError(f"{what} {value[:80]!r}...: over {MAX_LABEL_CHARS} characters")


def escape_controls(text: str) -> str:
    """`text` with its control characters written as escapes (`\\x1b`): safe to print on a terminal."""
    return _CONTROL.sub(lambda m: m[0].encode("unicode_escape").decode(), text)


def check_labels(name: str, episode_id: str, podcast: str | None) -> None:
    """`check_label` of a transcript's name, episode id and podcast (before it is parsed, or logged)."""
    check_label(name, "transcript name")
    check_label(episode_id, f"{name or 'transcript'}: episode id")
    if podcast is not None:
        check_label(podcast, f"{name or 'transcript'}: podcast")


def podcast_key(podcast: str | None) -> str:
    """The podcast's part of every id: a readable slug plus a hash of the exact (NFC) name.

    The hash keeps names that slug alike ("Show A", "show-a") apart; the key never holds '/'.
    """
    if podcast is None:
        return NO_PODCAST
    return slug_key(normal_podcast(podcast), KEY_HASH_DIGITS)


def slug_key(podcast: str, digits: int) -> str:
    """`podcast_key` of `podcast` as written, with `digits` hex digits (ids before `podembed migrate`: 8)."""
    slug = _SLUG_CHARS.sub("-", podcast.lower()).strip("-")[:40]
    return f"{slug}.{hashlib.sha256(podcast.encode()).hexdigest()[:digits]}"


def episode_key(podcast: str | None, episode_id: str) -> str:
    """An episode's identity: its own id within its podcast (two shows may both have an `E01`)."""
    return f"{podcast_key(podcast)}/{episode_id}"


def text_key(text: str, spec: VectorSpec) -> str:
    """Equal text under an equal vector key gives an equal vector: the corpus-wide dedupe key."""
    return hashlib.sha256(f"{spec.key}\x00{text}".encode()).hexdigest()


def embedding_id(chunk_id: str, vector_key: str) -> str:
    """`_id` of a chunk's vector document: one per chunk and vector key."""
    return f"{chunk_id}|{vector_key}"


# Slots: a transcript of a million cues holds a million of these.
@dataclass(frozen=True, slots=True)
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

    def __post_init__(self) -> None:
        # Every source and the API make their episodes here: one check for all of them.
        check_labels(self.source, self.episode_id, self.podcast)
        self.podcast = normal_podcast(self.podcast)

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
    # How the vector is stored (`PODEMBED_VECTOR_DTYPE`): float32, int8 or binary (packed bits).
    dtype: str = "float32"

    @property
    def key(self) -> str:
        fields = asdict(self)
        if self.dtype == "float32":
            del fields["dtype"]  # the keys of float32 vectors stay those stored before dtypes existed
        payload = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def weights(self) -> tuple[str, str | None, bool]:
        """What a worker must hold to embed under this spec: model, revision and pooling."""
        return (self.model, self.revision, self.pool_instruction)

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

    def ticket(self) -> BatchTicket:
        return BatchTicket(job_id=self.job_id, batch_id=self.batch_id, spec=self.spec,
                           chunk_ids=[c.chunk_id for c in self.chunks], force=self.force)


# What a payload may hold: ids as podembed makes them, and bounds far above real batches.
JOB_ID = re.compile(r"[0-9a-f]{12}")
BATCH_ID = re.compile(r"(?P<job>[0-9a-f]{12})-(?P<index>\d{5,9})")
MAX_ID_CHARS = 1024
MAX_INSTRUCTION_CHARS = 4096
MAX_BATCH_CHUNKS = 100_000


@dataclass(frozen=True)
class BatchTicket:
    """What a batch's RQ job carries (the claim check): ids only; the texts wait in MongoDB `chunks`."""

    job_id: str
    batch_id: str
    spec: VectorSpec
    chunk_ids: list[str]
    force: bool = False

    def to_payload(self) -> dict[str, Any]:
        """A JSON-ready dict (RQ jobs use the JSON serializer)."""
        return asdict(self)

    @classmethod
    def from_payload(cls, payload: object) -> BatchTicket:
        """The ticket of a payload, checked field by field: anything else is a PayloadError."""
        fields = _fields(payload, "payload", {"job_id": str, "batch_id": str, "spec": dict, "chunk_ids": list,
                                              "force": bool})
        job_id, batch_id = fields["job_id"], fields["batch_id"]
        if not JOB_ID.fullmatch(job_id):
            raise PayloadError(f"payload.job_id {job_id[:40]!r} is not a job id")
        match = BATCH_ID.fullmatch(batch_id)
        if match is None or match["job"] != job_id:
            raise PayloadError(f"payload.batch_id {batch_id[:40]!r} is not a batch of job {job_id}")
        # Batches queued before vector dtypes existed carry no `dtype`: float32.
        spec = _fields({"dtype": "float32", **fields["spec"]} if isinstance(fields["spec"], dict) else fields["spec"],
                       "payload.spec", {"model": str, "revision": (str, type(None)), "instruction": str,
                                        "pool_instruction": bool, "normalize": bool, "dtype": str})
        if spec["dtype"] not in VECTOR_DTYPES:
            raise PayloadError(f"payload.spec.dtype {spec['dtype'][:20]!r} is not one of {', '.join(VECTOR_DTYPES)}")
        if not 0 < len(spec["model"]) <= MAX_ID_CHARS or len(spec["instruction"]) > MAX_INSTRUCTION_CHARS:
            raise PayloadError("payload.spec: model or instruction of a length no batch has")
        chunk_ids = fields["chunk_ids"]
        if not 0 < len(chunk_ids) <= MAX_BATCH_CHUNKS:
            raise PayloadError(f"payload.chunk_ids: {len(chunk_ids)} ids, not 1 to {MAX_BATCH_CHUNKS}")
        for chunk_id in chunk_ids:
            if not isinstance(chunk_id, str) or not 0 < len(chunk_id) <= MAX_ID_CHARS or ":" not in chunk_id:
                raise PayloadError(f"payload.chunk_ids: {str(chunk_id)[:40]!r} is not a chunk id")
        return cls(job_id=job_id, batch_id=batch_id, spec=VectorSpec(**spec), chunk_ids=chunk_ids,
                   force=fields["force"])


def _fields(value: object, name: str, types: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """`value` as a dict of exactly these fields of these types (bool is not taken for int)."""
    if not isinstance(value, dict):
        raise PayloadError(f"{name}: must be an object, got {type(value).__name__}")
    if set(value) != set(types):
        raise PayloadError(f"{name}: fields {sorted(map(str, value))} are not {sorted(types)}")
    for key, kind in types.items():
        if not isinstance(value[key], kind):
            raise PayloadError(f"{name}.{key}: must be {kind}, got {type(value[key]).__name__}")
    return value
