"""MongoDB writes of the worker: vectors in `embeddings`, the per-batch ledger in `batches`.

Every write is an upsert keyed by a deterministic `_id`, so running a batch twice
never creates a second document. Vectors are BSON binary float32 (what Atlas
Vector Search indexes, and what nx-27017 stores quickly).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime

import numpy as np
from bson.binary import Binary, BinaryVectorDtype
from pymongo import UpdateOne
from pymongo.database import Database
from pymongo.errors import PyMongoError

from config.errors import StoreError
from producer.models import Chunk, VectorSpec


def to_bson_vector(vector: np.ndarray) -> Binary:
    return Binary.from_vector(vector.astype(np.float32, copy=False), BinaryVectorDtype.FLOAT32)


def from_bson_vector(value: bytes | Binary) -> np.ndarray:
    """nx-27017 hands vectors back as plain bytes, a real server as Binary: read both."""
    return np.asarray(Binary(bytes(value), 9).as_vector(return_numpy=True).data, dtype=np.float32)


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

    def upsert(self, docs: list[dict]) -> None:
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

    def record(self, entry: LedgerEntry) -> None:
        """The ledger is keyed by batch id: a batch that runs again replaces its entry."""
        try:
            # `_id` in the document too: nx-27017 does not take it from the filter on upsert.
            self.batches.replace_one({"_id": entry.batch_id}, {"_id": entry.batch_id, **asdict(entry)}, upsert=True)
        except PyMongoError as exc:
            raise StoreError(f"cannot write ledger entry {entry.batch_id}: {exc}") from exc


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
