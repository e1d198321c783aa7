"""Chunk texts and metadata in MongoDB `chunks`: the claim check behind every queued batch.

The producer writes each chunk once, keyed by its id, with unordered bulk upserts; a batch
on the queue then carries only chunk ids (tens of bytes each), and the worker reads one
batch's chunks back in one query. The producer also asks which chunks already have their
vector under a vector key, so that they are never queued, and (for a backfill's dry run) which
chunks' texts have one anywhere in the corpus.

The claim check is consumed: once a batch's vectors are stored, the worker deletes its chunks (those
whose text is still the one it embedded), so a catalog keeps each text once, in `embeddings`. A batch
run again after that (RQ's retry of a batch that stored its vectors and then failed) reads its texts
back from its own vectors. Chunks whose batches never store (failed for good, cancelled, a job that was
never drained) are dropped by a TTL index on `written_at` after `PODEMBED_CHUNK_RETENTION` seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime

from pymongo import DeleteOne, ReplaceOne
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import OperationFailure, PyMongoError

from config.errors import PayloadError, StoreError
from producer.models import Chunk, VectorSpec, text_key

# `$in` lists of ids stay well under MongoDB's 16 MB command size.
ID_SLICE = 1000
# The TTL index that drops chunks no batch stored; MongoDB's code for an index with other options.
RETENTION_INDEX = "written_at_ttl"
INDEX_OPTIONS_CONFLICT = 85


class ChunkStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def write(self, chunks: Sequence[Chunk]) -> None:
        """Store the chunks (a chunk written again replaces its text: the transcript changed)."""
        if not chunks:
            return
        # `_id` in the document too: nx-27017 does not take it from the filter on upsert.
        now = datetime.now(UTC)
        writes = [ReplaceOne({"_id": c.chunk_id}, _chunk_doc(c, now), upsert=True) for c in chunks]
        try:
            self.db.chunks.bulk_write(writes, ordered=False)
        except PyMongoError as exc:
            raise StoreError(f"cannot write {len(chunks)} chunks to {self.db.name}.chunks: {exc}") from exc

    def ensure_retention(self, seconds: int) -> None:
        """Chunks are dropped `seconds` after they were written (the TTL index, its expiry changed in place)."""
        try:
            try:
                self.db.chunks.create_index("written_at", name=RETENTION_INDEX, expireAfterSeconds=seconds)
            except OperationFailure as exc:
                if exc.code != INDEX_OPTIONS_CONFLICT:
                    raise
                self.db.command("collMod", "chunks", index={"name": RETENTION_INDEX, "expireAfterSeconds": seconds})
        except PyMongoError as exc:
            raise StoreError(f"cannot create the retention index on {self.db.name}.chunks: {exc}") from exc

    def load(self, chunk_ids: Sequence[str], spec: VectorSpec | None = None) -> list[Chunk]:
        """The chunks of these ids, in this order: from `chunks`, else (consumed once their vectors were stored)
        from their vectors under `spec`; one found in neither is a PayloadError."""
        docs = self._find(self.db.chunks, list(chunk_ids))
        missing = [i for i in chunk_ids if i not in docs]
        if missing and spec is not None:
            stored = self._find(self.db.embeddings, [spec.embedding_id(i) for i in missing])
            docs |= {d["chunk_id"]: {**d, "_id": d["chunk_id"]} for d in stored.values()}
            missing = [i for i in missing if i not in docs]
        if missing:
            raise PayloadError(f"the texts of {len(missing)} chunk(s) of the batch are gone from {self.db.name}.chunks "
                               f"(kept PODEMBED_CHUNK_RETENTION seconds), such as {missing[0][:80]!r}: "
                               "ingest their episodes again")
        return [_chunk(docs[i]) for i in chunk_ids]

    def consume(self, chunks: Sequence[Chunk]) -> int:
        """Delete these chunks once their vectors are stored, unless their text changed since (a newer job
        wrote it again and still needs it); how many went."""
        if not chunks:
            return 0
        try:
            result = self.db.chunks.bulk_write([DeleteOne({"_id": c.chunk_id, "text": c.text}) for c in chunks],
                                               ordered=False)
        except PyMongoError as exc:
            raise StoreError(f"cannot delete {len(chunks)} chunks from {self.db.name}.chunks: {exc}") from exc
        return result.deleted_count

    def _find(self, collection: Collection, ids: list[str]) -> dict[str, dict]:
        try:
            # One reply for the whole batch: the server's first reply holds 101 documents otherwise.
            return {d["_id"]: d for d in collection.find({"_id": {"$in": ids}}, batch_size=len(ids))}
        except PyMongoError as exc:
            raise StoreError(f"cannot read {collection.full_name}: {exc}") from exc

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


def _chunk_doc(chunk: Chunk, written_at: datetime) -> dict:
    doc = asdict(chunk)
    doc["_id"] = doc.pop("chunk_id")
    doc["written_at"] = written_at
    return doc


def _chunk(doc: dict) -> Chunk:
    return Chunk(chunk_id=doc["_id"], episode_id=doc["episode_id"], podcast=doc["podcast"], seq=doc["seq"],
                 start=doc["start"], end=doc["end"], speakers=list(doc["speakers"]), text=doc["text"],
                 n_tokens=doc["n_tokens"])
