"""What MongoDB keeps per embedded chunk, from the server's own `collStats`.

Data and indexes apart. nx-27017 reports each collection's data `size` but no per-collection index sizes
(`indexSizes` is empty and `totalIndexSize` 0): there the index bytes are None, not 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from pymongo.database import Database
from pymongo.errors import PyMongoError

from config.errors import StoreError


@dataclass
class CollectionBytes:
    name: str
    documents: int
    data_bytes: int
    index_bytes: int | None  # None: the server does not report it


def collection_bytes(db: Database, name: str) -> CollectionBytes:
    """The collection's documents, data bytes (uncompressed BSON) and index bytes, as the server counts them."""
    try:
        stats = db.command("collStats", name)
    except PyMongoError as exc:
        raise StoreError(f"cannot read collStats of {db.name}.{name}: {exc}") from exc
    reported = bool(stats.get("indexSizes"))
    return CollectionBytes(name=name, documents=int(stats.get("count", 0)), data_bytes=int(stats.get("size", 0)),
                           index_bytes=int(stats["totalIndexSize"]) if reported else None)


def bytes_per_embedded_chunk(db: Database, waiting_chunks: int = 0) -> float:
    """Everything MongoDB keeps per embedded chunk: its vector document and its share of the indexes, plus
    the texts of `waiting_chunks` embedded chunks still in `chunks` (none once their batches stored)."""
    vectors, chunks = collection_bytes(db, "embeddings"), collection_bytes(db, "chunks")
    if not vectors.documents:
        return 0.0
    held = vectors.data_bytes + (vectors.index_bytes or 0)
    if chunks.documents:
        held += waiting_chunks * chunks.data_bytes / chunks.documents
    return held / vectors.documents
