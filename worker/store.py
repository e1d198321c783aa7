"""MongoDB writes of the worker: vectors in `embeddings`, the per-batch ledger in `batches`, and per vector
key a change token in `vector_changes`.

Every write is an upsert keyed by a deterministic `_id`, so running a batch twice
never creates a second document. Vectors are BSON binary float32 (what Atlas
Vector Search indexes, and what nx-27017 stores quickly).
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass
from datetime import datetime

import numpy as np
from bson.binary import Binary, BinaryVectorDtype
from pymongo import UpdateOne
from pymongo.database import Database
from pymongo.errors import PyMongoError

from config.errors import StoreError
from producer.models import Chunk, VectorSpec

# int8 vectors: each vector times INT8_MAX / its largest absolute component, rounded. The scale differs per
# vector and is not kept: cosine (the only score search computes) is the same for a vector and its multiples.
INT8_MAX = 127
# Per vector key (`_id`), a `token` that every write of its vectors replaces once stored: the search cache reads
# the vectors again only when the token (or the count) has changed since its last read. A write that moves
# documents to new ids (`podembed migrate`) replaces `whole` too: the cache then reads the key whole.
CHANGES = "vector_changes"


def to_bson_vector(vector: np.ndarray, dtype: str = "float32") -> Binary:
    """The BSON vector (subtype 9) of `vector` stored as `dtype`: float32, int8 (scaled as INT8_MAX says) or
    binary (packed bits, 1 where the component is positive; Atlas's int1)."""
    vector = np.asarray(vector, dtype=np.float32)
    if dtype == "int8":
        peak = float(np.abs(vector).max()) or 1.0
        return Binary.from_vector(np.rint(vector * (INT8_MAX / peak)).astype(np.int8), BinaryVectorDtype.INT8)
    if dtype == "binary":
        bits = np.packbits(vector > 0).tolist()
        return Binary.from_vector(bits, BinaryVectorDtype.PACKED_BIT, padding=-len(vector) % 8)
    return Binary.from_vector(vector, BinaryVectorDtype.FLOAT32)


def read_bson_vector(value: bytes | Binary) -> np.ndarray:
    """The stored form: float32, int8, or packed bits as uint8 (nx-27017 hands vectors back as plain bytes,
    a real server as Binary: read both)."""
    found = Binary(bytes(value), 9).as_vector(return_numpy=True)
    kind = {BinaryVectorDtype.FLOAT32: np.float32, BinaryVectorDtype.INT8: np.int8,
            BinaryVectorDtype.PACKED_BIT: np.uint8}[found.dtype]
    return np.asarray(found.data, dtype=kind)


def from_bson_vector(value: bytes | Binary) -> np.ndarray:
    """The vector as float32: int8 as stored (a multiple of the vector), bits as -1 and +1."""
    stored = read_bson_vector(value)
    if stored.dtype == np.uint8:
        padding = Binary(bytes(value), 9).as_vector().padding
        bits = np.unpackbits(stored)
        return (bits[:len(bits) - padding].astype(np.float32) * 2 - 1)
    return stored.astype(np.float32, copy=False)


@dataclass
class LedgerEntry:
    """One executed batch: what it cost and where it ran."""

    job_id: str
    batch_id: str
    model: str
    vector_key: str
    n_chunks: int
    n_embedded: int
    n_skipped: int
    n_tokens: int
    padded_tokens: int
    gpu_seconds: float
    # Time the batch waited on MongoDB (dedupe lookup, writes not hidden behind compute).
    store_wait_seconds: float
    wall_seconds: float
    device: str
    worker: str
    started_at: datetime
    finished_at: datetime
    cost_usd: float


class VectorStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.embeddings = db.embeddings
        self.batches = db.batches

    def ensure_indexes(self) -> None:
        try:
            self.embeddings.create_index("text_key")
        except PyMongoError as exc:
            raise StoreError(f"cannot create indexes on {self.db.name}.embeddings: {exc}") from exc

    def existing(self, keys: list[str], *, other_than_batch: str) -> dict[str, tuple[set[str], bytes]]:
        """For each text key already stored by another batch: the ids holding it and its vector.

        What an earlier, interrupted run of the same batch stored does not count, so the batch
        that runs again counts those chunks embedded (as an uninterrupted run would), not skipped.
        """
        found: dict[str, tuple[set[str], bytes]] = {}
        query = {"text_key": {"$in": keys}, "batch_id": {"$ne": other_than_batch}}
        try:
            # One reply for a batch's keys (each is usually stored once): the first reply holds 101 documents otherwise.
            for doc in self.embeddings.find(query, {"text_key": 1, "embedding": 1}, batch_size=max(101, len(keys))):
                ids, _ = found.setdefault(doc["text_key"], (set(), bytes(doc["embedding"])))
                ids.add(doc["_id"])
        except PyMongoError as exc:
            raise StoreError(f"cannot read {self.db.name}.embeddings: {exc}") from exc
        return found

    def upsert(self, docs: list[dict], *, moved: bool = False) -> None:
        """Write vector documents, then their keys' change tokens (`moved`: documents moved to new ids)."""
        if not docs:
            return
        # `_id` only in the filter: nx-27017 fails to overwrite a stored vector when `$set` names
        # `_id` too ("Binary is not JSON serializable"); an upsert takes `_id` from the filter.
        updates = [UpdateOne({"_id": d["_id"]}, {"$set": {k: v for k, v in d.items() if k != "_id"}}, upsert=True)
                   for d in docs]
        try:
            self.embeddings.bulk_write(updates, ordered=False)
        except PyMongoError as exc:
            raise StoreError(f"cannot write {len(docs)} vectors to {self.db.name}.embeddings: {exc}") from exc
        self.mark_changed({d["vector_key"] for d in docs}, moved=moved)

    def mark_changed(self, vector_keys: set[str], *, moved: bool = False) -> None:
        """Give each vector key a new change token (after its vectors are written, so a reader that sees the token
        finds them); `moved`: a new `whole` token too, as documents moved to new ids."""
        try:
            for key in sorted(vector_keys):
                token = secrets.token_hex(8)
                self.db[CHANGES].update_one({"_id": key}, {"$set": {"token": token} | ({"whole": token} if moved
                                                                                      else {})}, upsert=True)
        except PyMongoError as exc:
            raise StoreError(f"cannot write the change token of {self.db.name}.embeddings: {exc}") from exc

    def record(self, entry: LedgerEntry) -> None:
        """The ledger is keyed by batch id: a batch that runs again replaces its entry."""
        try:
            # `_id` in the document too: nx-27017 does not take it from the filter on upsert.
            self.batches.replace_one({"_id": entry.batch_id}, {"_id": entry.batch_id, **asdict(entry)}, upsert=True)
        except PyMongoError as exc:
            raise StoreError(f"cannot write ledger entry {entry.batch_id}: {exc}") from exc


@dataclass(frozen=True)
class Change:
    """A vector key's change tokens: `token` of its last write, `whole` of its last move to new ids (None: none)."""

    token: str
    whole: str | None = None


def read_change(db: Database, vector_key: str) -> Change | None:
    """The change tokens of `vector_key` (None: no write has set one)."""
    try:
        found = db[CHANGES].find_one({"_id": vector_key})
    except PyMongoError as exc:
        raise StoreError(f"cannot read the change token of {db.name}.embeddings: {exc}") from exc
    return Change(found["token"], found.get("whole")) if found else None


def vector_doc(
    chunk: Chunk, spec: VectorSpec, key: str, vector: Binary, *, dim: int, job_id: str, batch_id: str,
    embedded_at: datetime,
) -> dict:
    return {
        "_id": spec.embedding_id(chunk.chunk_id),
        "chunk_id": chunk.chunk_id,
        "episode_id": chunk.episode_id,
        "podcast": chunk.podcast,
        "seq": chunk.seq,
        "start": chunk.start,
        "end": chunk.end,
        "speakers": chunk.speakers,
        "text": chunk.text,
        "text_sha256": chunk.text_sha256,
        "text_key": key,
        "n_tokens": chunk.n_tokens,
        "model": spec.model,
        "instruction": spec.instruction,
        "vector_key": spec.key,
        "dim": dim,
        "embedding": vector,
        "job_id": job_id,
        "batch_id": batch_id,
        "embedded_at": embedded_at,
    }
