"""What is stored, by podcast and episode: export the vectors, or delete them.

Both select by the `podcast` and `episode_id` fields (never by parsing ids), so they work the
same on nx-27017, a real MongoDB and Atlas. Deleting removes the vectors, the chunk texts in
`chunks` and the rows of the local search caches, and drops the episodes from the nightly
watermark, so a later nightly embeds them again; the ledger stays as it is.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from pymongo.database import Database
from pymongo.errors import PyMongoError

from config.closest import no_such
from config.errors import ConfigError, PodembedError, SelectionError, StoreError
from config.services import replacing
from producer.models import normal_podcast
from producer.watermark import forget_episodes
from worker.read.vector_cache import drop_cached
from worker.store import from_bson_vector

FORMATS = ("jsonl", "parquet")
# Columns every exported vector carries besides the vector itself.
FIELDS = ("chunk_id", "podcast", "episode_id", "seq", "start", "end", "speakers", "text", "model", "instruction",
          "vector_key", "dim")
# Rows per Parquet row group: keeps memory flat however many vectors a podcast has.
PARQUET_ROWS = 2048


@dataclass
class ExportResult:
    vectors: int
    episodes: int
    format: str
    out: str | None


@dataclass
class DeleteResult:
    podcast: str | None
    episode_id: str | None
    vectors: int
    chunks: int
    cached_rows: int
    episodes: list[str]
    watermark_entries: int
    dry_run: bool


@dataclass(frozen=True)
class Selection:
    """Stored vectors of one podcast (None: the episodes ingested without one), or one of its episodes,
    under one model. The name is taken in NFC, as ingest stores it."""

    podcast: str | None
    episode_id: str | None = None
    model: str | None = None
    query: dict[str, object] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "podcast", normal_podcast(self.podcast))
        # `$eq`, not a bare None: nx-27017 counts (and deletes) `{"podcast": None}` short of what it finds.
        query: dict = {"podcast": self.podcast if self.podcast is not None else {"$eq": None}}
        if self.episode_id is not None:
            query["episode_id"] = self.episode_id
        if self.model is not None:
            query["model"] = self.model
        object.__setattr__(self, "query", query)

    def describe(self) -> str:
        episode = f" episode {self.episode_id!r}" if self.episode_id is not None else ""
        model = f" under {self.model}" if self.model is not None else ""
        show = "no podcast" if self.podcast is None else f"podcast {self.podcast!r}"
        return f"{show}{episode}{model}"


def export_vectors(db: Database, selection: Selection, fmt: str, out: Path | None, stdout: IO[bytes]) -> ExportResult:
    """Write the selected vectors (ordered by episode and seq) as JSONL or Parquet to `out`, else `stdout`.

    A file appears only complete: it is written to a new private file beside `out` and renamed at the end.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")
    if fmt == "parquet" and out is None:
        raise ConfigError("--format parquet writes a file: give --out FILE")
    if out is not None and out.is_dir():
        raise ConfigError(f"--out {out} is a directory, not a file")
    episodes: set[str] = set()

    def rows() -> Iterator[dict[str, Any]]:
        for row in _stored_rows(db, selection):
            episodes.add(row["episode_id"])
            yield row

    def found(written: int) -> int:
        if not written:
            require_stored(db, selection.podcast, selection.episode_id)  # a name that matches nothing: the closest
            raise PodembedError(f"no stored vectors of {selection.describe()}")
        return written

    if out is None:
        return ExportResult(vectors=found(_write_jsonl(rows(), stdout)), episodes=len(episodes), format=fmt, out=None)
    try:
        # Raised inside the block, "nothing found" leaves no file behind.
        with replacing(out) as file:
            written = found((_write_jsonl if fmt == "jsonl" else _write_parquet)(rows(), file))
    except OSError as exc:
        raise ConfigError(f"cannot write --out {out}: {exc.strerror or exc}") from None
    return ExportResult(vectors=written, episodes=len(episodes), format=fmt, out=str(out))


def delete_vectors(db: Database, selection: Selection, *, search_caches: Iterable[Path] = (),
                   dry_run: bool = False) -> DeleteResult:
    """Delete the selected vectors (every model's), chunk texts, rows of the `search_caches` files and
    watermark entries; the ledger stays. The counts say what went (or would go) from each."""
    counts: dict[str, int] = {}
    episodes: set[str] = set()
    # The chunks last: a delete cut short leaves texts that a rerun finds, never vectors without their text.
    for collection in (db.embeddings, db.chunks):
        try:
            episodes |= {d["episode_id"] for d in collection.find(selection.query, {"episode_id": 1})}
            counts[collection.name] = collection.count_documents(selection.query)
            if not dry_run and counts[collection.name]:
                collection.delete_many(selection.query)
        except PyMongoError as exc:
            raise StoreError(f"cannot delete from {collection.full_name}: {exc}") from exc
    cached = sum(drop_cached(path, selection.podcast, selection.episode_id, dry_run=dry_run)
                 for path in search_caches)
    forgotten = forget_episodes(db, selection.podcast, episodes, dry_run=dry_run)
    return DeleteResult(podcast=selection.podcast, episode_id=selection.episode_id, vectors=counts["embeddings"],
                        chunks=counts["chunks"], cached_rows=cached, episodes=sorted(episodes),
                        watermark_entries=forgotten, dry_run=dry_run)


def require_stored(db: Database, podcast: str | None, episode_id: str | None = None) -> None:
    """Raise a SelectionError naming the podcast (or its episode) that no stored vector has, with the
    closest names stored. Distinct values, answered by the server; a scan on nx-27017 (about 1 s for
    20,000 vectors), so only once a selection found nothing."""
    try:
        podcasts = db.embeddings.distinct("podcast")
        if podcast is not None and podcast not in podcasts:
            raise SelectionError(no_such("podcast", podcast, podcasts, "among the stored vectors"))
        if episode_id is None:
            return
        query = {} if podcast is None else {"podcast": podcast}
        episodes = db.embeddings.distinct("episode_id", query)
    except PyMongoError as exc:
        raise StoreError(f"cannot read {db.name}.embeddings: {exc}") from exc
    if episode_id not in episodes:
        where = "among the stored vectors" if podcast is None else f"of podcast {podcast!r} among the stored vectors"
        raise SelectionError(no_such("episode", episode_id, episodes, where))


def _stored_rows(db: Database, selection: Selection) -> Iterator[dict[str, Any]]:
    projection = {name: 1 for name in (*FIELDS, "embedding")}
    try:
        for doc in db.embeddings.find(selection.query, projection).sort([("episode_id", 1), ("seq", 1)]):
            row = {name: doc.get(name) for name in FIELDS}
            row["embedding"] = from_bson_vector(doc["embedding"])
            yield row
    except PyMongoError as exc:
        raise StoreError(f"cannot read {db.name}.embeddings: {exc}") from exc


def _write_jsonl(rows: Iterator[dict[str, Any]], file: IO[bytes]) -> int:
    written = 0
    for row in rows:
        vector = row.pop("embedding")
        # str() of a float32 is its shortest exact form: the JSON numbers read back to the same float32s.
        line = json.dumps(row, ensure_ascii=False)[:-1] + f', "embedding": [{", ".join(map(str, vector))}]}}\n'
        file.write(line.encode())
        written += 1
    return written


def _write_parquet(rows: Iterator[dict[str, Any]], file: IO[bytes]) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("Parquet export needs pyarrow: pip install 'podembed[parquet]'") from None
    writer = None
    written = 0
    group: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal writer
        dim = len(group[0]["embedding"])
        if writer is None:
            writer = pq.ParquetWriter(file, _arrow_schema(pa, dim))
        if any(len(r["embedding"]) != writer.schema.field("embedding").type.list_size for r in group):
            raise PodembedError("the selected vectors differ in dimension: export one model at a time (--model)")
        columns = {n: [r[n] for r in group] for n in FIELDS}
        flat = pa.array(np.concatenate([r["embedding"] for r in group]), type=pa.float32())
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(flat, dim)
        writer.write_table(pa.table(columns, schema=writer.schema))
        group.clear()

    for row in rows:
        group.append(row)
        written += 1
        if len(group) == PARQUET_ROWS:
            flush()
    if group:
        flush()
    if writer is not None:
        writer.close()
    return written



def _arrow_schema(pa: Any, dim: int) -> Any:
    text, number = pa.string(), pa.float64()
    return pa.schema([("chunk_id", text), ("podcast", text), ("episode_id", text), ("seq", pa.int32()),
                      ("start", number), ("end", number), ("speakers", pa.list_(text)), ("text", text),
                      ("model", text), ("instruction", text), ("vector_key", text), ("dim", pa.int32()),
                      ("embedding", pa.list_(pa.float32(), dim))])
