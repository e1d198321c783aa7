"""What MongoDB keeps per embedded chunk, from the server's own `collStats`.

Data and indexes apart. nx-27017 reports each collection's data `size` but no per-collection index sizes
(`indexSizes` is empty and `totalIndexSize` 0): there the index bytes are None, not 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from pymongo.database import Database
from pymongo.errors import PyMongoError

from config.errors import SelectionError, StoreError


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


# RAM an Atlas Vector Search index needs per vector, as a fraction of the float32 vector's 4 x dimensions
# bytes (Atlas's "Vector Search index sizing": a 768-d float32 vector takes about 3 KB; scalar quantization
# needs about 1/3.75 of that, binary about 1/24).
INDEX_RAM_FRACTION = {"none": 1.0, "scalar": 1 / 3.75, "binary": 1 / 24}
PROJECT_CHUNKS = (1_000_000, 14_000_000, 100_000_000)
# Stored bytes per vector component of each dtype (binary: one bit).
COMPONENT_BYTES = {"float32": 4.0, "int8": 1.0, "binary": 1 / 8}


@dataclass
class StorageReport:
    vector_key: str
    dtype: str
    dimensions: int  # of the vectors measured, or `--dims`
    measured_dimensions: int
    embedded_chunks: int
    collections: list[CollectionBytes]
    database_index_bytes: int  # dbStats indexSize: every index of the database
    bytes_per_embedded_chunk: dict[str, float]  # by collection, data and indexes apart, and "total"
    index_ram_bytes_per_vector: dict[str, float]  # by Atlas quantization
    projections: list[dict[str, float]]  # per N chunks: disk GB, RAM GB by quantization
    notes: list[str]


def storage_report(db: Database, vector_key: str, dtype: str, *, chunks: tuple[int, ...] = PROJECT_CHUNKS,
                   dims: int | None = None) -> StorageReport:
    """What MongoDB keeps per embedded chunk (measured) and what N chunks would take on disk and in index RAM.

    With `dims`, the vector bytes are recomputed for that dimension (the measured text and fields unchanged).
    """
    try:
        sample = db.embeddings.find_one({"vector_key": vector_key}, {"dim": 1})
        totals = db.command("dbStats")
    except PyMongoError as exc:
        raise StoreError(f"cannot read {db.name}: {exc}") from exc
    if sample is None:
        raise SelectionError(f"no vectors stored under vector key {vector_key}: ingest or backfill first")
    measured_dims = int(sample["dim"])
    collections = [collection_bytes(db, name) for name in ("embeddings", "chunks", "batches", "jobs")]
    embedded = collections[0].documents
    per: dict[str, float] = {}
    for found in collections:
        per[f"{found.name}_data"] = found.data_bytes / embedded
        if found.index_bytes is not None:
            per[f"{found.name}_indexes"] = found.index_bytes / embedded
    notes = []
    if all(found.index_bytes is None for found in collections):
        # nx-27017: no per-collection index sizes; the database's index bytes stand in, all counted.
        per["database_indexes"] = int(totals.get("indexSize", 0)) / embedded
        notes.append("this server reports no per-collection index sizes (collStats indexSizes is empty): "
                     "database_indexes is dbStats indexSize, every index of the database")
    target = dims or measured_dims
    if target != measured_dims:
        per["embeddings_data"] += (target - measured_dims) * COMPONENT_BYTES[dtype]
        notes.append(f"vector bytes recomputed for {target} dimensions from the {measured_dims} measured")
    per["total"] = sum(per.values())
    ram = {q: 4 * target * fraction for q, fraction in INDEX_RAM_FRACTION.items()}
    projections = [{"chunks": n, "disk_gb": per["total"] * n / 1e9,
                    **{f"index_ram_gb_{q}": bytes_ * n / 1e9 for q, bytes_ in ram.items()}} for n in chunks]
    return StorageReport(vector_key=vector_key, dtype=dtype, dimensions=target, measured_dimensions=measured_dims,
                         embedded_chunks=embedded, collections=collections,
                         database_index_bytes=int(totals.get("indexSize", 0)), bytes_per_embedded_chunk=per,
                         index_ram_bytes_per_vector=ram, projections=projections, notes=notes)
