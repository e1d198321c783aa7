"""Chunk texts and metadata in MongoDB `chunks`: the claim check behind every queued batch.

The producer writes each chunk once, keyed by its id, with unordered bulk upserts; a batch
on the queue then carries only chunk ids (tens of bytes each), and the worker reads one
batch's chunks back in one query. The producer also asks which chunks already have their
vector under a vector key, so that they are never queued, and (for a backfill's dry run) which
chunks' texts have one anywhere in the corpus.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

from pymongo import ReplaceOne
from pymongo.database import Database
from pymongo.errors import PyMongoError

from config.errors import PayloadError, StoreError
from producer.models import Chunk, VectorSpec, text_key

# `$in` lists of ids stay well under MongoDB's 16 MB command size.
ID_SLICE = 1000


class ChunkStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def write(self, chunks: Sequence[Chunk]) -> None:
        """Store the chunks (a chunk written again replaces its text: the transcript changed)."""
        if not chunks:
            return
        # `_id` in the document too: nx-27017 does not take it from the filter on upsert.
        writes = [ReplaceOne({"_id": c.chunk_id}, _chunk_doc(c), upsert=True) for c in chunks]
        try:
            self.db.chunks.bulk_write(writes, ordered=False)
        except PyMongoError as exc:
            raise StoreError(f"cannot write {len(chunks)} chunks to {self.db.name}.chunks: {exc}") from exc

    def load(self, chunk_ids: Sequence[str]) -> list[Chunk]:
        """The chunks of these ids, in this order; one a batch names but MongoDB lacks is a PayloadError."""
        try:
            # One reply for the whole batch: the server's first reply holds 101 documents otherwise.
            cursor = self.db.chunks.find({"_id": {"$in": list(chunk_ids)}}, batch_size=len(chunk_ids))
            docs = {d["_id"]: d for d in cursor}
        except PyMongoError as exc:
            raise StoreError(f"cannot read chunks from {self.db.name}.chunks: {exc}") from exc
        missing = [i for i in chunk_ids if i not in docs]
        if missing:
            raise PayloadError(f"{len(missing)} chunk(s) of the batch are not in {self.db.name}.chunks, "
                               f"such as {missing[0][:80]!r}")
        return [_chunk(docs[i]) for i in chunk_ids]

    def to_embed(self, chunks: Sequence[Chunk], spec: VectorSpec, *, force: bool) -> list[Chunk]:
        """The chunks to queue: all of them with `force`, else those with no vector under `spec` from this text."""
        done = set() if force else self.embedded(chunks, spec)
        return [c for c in chunks if c.chunk_id not in done]

    def embedded(self, chunks: Sequence[Chunk], spec: VectorSpec) -> set[str]:
        """Ids of the chunks whose vector under `spec` is stored, made from the same text."""
        wanted = {spec.embedding_id(c.chunk_id): c for c in chunks}
        ids = list(wanted)
        done: set[str] = set()
        try:
            for start in range(0, len(ids), ID_SLICE):
                for doc in self.db.embeddings.find({"_id": {"$in": ids[start : start + ID_SLICE]}},
                                                   {"text_sha256": 1}):
                    chunk = wanted[doc["_id"]]
                    if doc.get("text_sha256") == chunk.text_sha256:
                        done.add(chunk.chunk_id)
        except PyMongoError as exc:
            raise StoreError(f"cannot read {self.db.name}.embeddings: {exc}") from exc
        return done


    def text_stored(self, chunks: Sequence[Chunk], spec: VectorSpec) -> set[str]:
        """Ids of the chunks whose text has a vector under `spec` anywhere in the corpus (the worker reuses it)."""
        keys = {c.chunk_id: text_key(c.text, spec) for c in chunks}
        wanted = sorted(set(keys.values()))
        found: set[str] = set()
        try:
            for start in range(0, len(wanted), ID_SLICE):
                found.update(doc["text_key"] for doc in self.db.embeddings.find(
                    {"text_key": {"$in": wanted[start : start + ID_SLICE]}}, {"text_key": 1}))
        except PyMongoError as exc:
            raise StoreError(f"cannot read {self.db.name}.embeddings: {exc}") from exc
        return {chunk_id for chunk_id, key in keys.items() if key in found}


def _chunk_doc(chunk: Chunk) -> dict:
    doc = asdict(chunk)
    doc["_id"] = doc.pop("chunk_id")
    return doc


def _chunk(doc: dict) -> Chunk:
    return Chunk(chunk_id=doc["_id"], episode_id=doc["episode_id"], podcast=doc["podcast"], seq=doc["seq"],
                 start=doc["start"], end=doc["end"], speakers=list(doc["speakers"]), text=doc["text"],
                 n_tokens=doc["n_tokens"])
