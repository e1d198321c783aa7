"""A local copy of the stored vectors of one vector key, for the exact cosine scan.

The copy lives in memory and in one `.npz` file under the data directory, so a new process
starts warm. `refresh` reads nothing while the key's change token (which every podembed write of
vectors replaces) and its stored count are what they were at the last read. Otherwise it reads only
what changed: the documents embedded since its last read began (less an overlap for worker clocks
and writes that land late), merged by `_id`, so a re-embedded chunk replaces its old vector. When the
stored count for the key differs from the cache's after that merge (a deletion, or a write the
overlap missed), or documents were moved to new ids since (their times unchanged), the cache is
read again whole.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from pymongo.collection import Collection
from pymongo.errors import PyMongoError

from config.errors import SearchError, StoreError
from config.services import private_dir, replacing
from worker.store import Change, read_bson_vector, read_change

logger = logging.getLogger(__name__)

# What a search hit shows of a chunk; the cache reads them with the vectors, so the exact engine answers from it.
HIT_FIELDS = {"chunk_id": 1, "episode_id": 1, "podcast": 1, "start": 1, "end": 1, "text": 1}
PROJECTION = {"embedding": 1} | HIT_FIELDS


@dataclass
class RefreshStats:
    read: int = 0
    rebuilt: bool = False


class VectorCache:
    """The vectors of one vector key as stored (float32 ones at unit length, int8 as stored, binary as packed
    bits), with the fields search filters on and shows (chunk id, times, text), row by row.

    `version` changes whenever the rows do and is saved with them, so what is built from them (the BM25 index,
    saved beside at `lexical_path`) knows when to rebuild, in this process or a later one.
    """

    def __init__(self, path: Path, vector_key: str, overlap: timedelta) -> None:
        self.path = path
        self.vector_key = vector_key
        self.overlap = overlap
        self.lexical_path = path.with_suffix(".bm25")
        self._clear()
        self._load()

    def __len__(self) -> int:
        return len(self.ids)

    def refresh(self, embeddings: Collection) -> RefreshStats:
        """Bring the cache up to date with `embeddings`; rebuild it when counts disagree."""
        stats = RefreshStats()
        began = datetime.now(UTC)
        # Read before the vectors: a write whose token comes later is read again at the next refresh.
        change = read_change(embeddings.database, self.vector_key)
        # Without a token (vectors stored before tokens were kept, or by other software) every refresh reads the
        # recent documents.
        if change is not None and change == self.change and _count(embeddings, self.vector_key) == len(self.ids):
            return stats
        known = self.change.whole if self.change else None
        if len(self.ids) and change is not None and change.whole not in (None, known):
            self._clear()  # moved to new ids with their times: the recent documents would not hold them
            stats.rebuilt = True
        query: dict = {"vector_key": self.vector_key}
        if self.checked is not None:
            query["embedded_at"] = {"$gte": self.checked - self.overlap}
        stats.read = self._merge(_read(embeddings, query))
        if _count(embeddings, self.vector_key) != len(self.ids):
            logger.info("vector cache %s: stored count differs from the cache's; reading it again", self.vector_key)
            self._clear()
            stats.read = self._merge(_read(embeddings, {"vector_key": self.vector_key}))
            stats.rebuilt = True
        self.checked = began
        if stats.read or stats.rebuilt or change != self.change:
            self.change = change
            self.save()
        return stats

    def hit_fields(self, doc_id: str) -> dict | None:
        """The HIT_FIELDS of the chunk of vector `_id` `doc_id` (None: not cached)."""
        row = self._row.get(doc_id)
        if row is None:
            return None
        return {"chunk_id": self.chunk_ids[row], "episode_id": self.episode_ids[row], "podcast": self.podcasts[row],
                "start": float(self.starts[row]), "end": float(self.ends[row]), "text": self.texts[row]}

    def rows(self, podcast: str | None = None, episode_id: str | None = None) -> np.ndarray | None:
        """Indices of the rows that pass the filters (None: every row)."""
        if podcast is None and episode_id is None:
            return None
        mask = np.ones(len(self.ids), dtype=bool)
        if podcast is not None:
            mask &= self.podcasts == podcast
        if episode_id is not None:
            mask &= self.episode_ids == episode_id
        return np.flatnonzero(mask)

    def _clear(self) -> None:
        self.ids = np.empty(0, dtype=object)
        self.episode_ids = np.empty(0, dtype=object)
        self.podcasts = np.empty(0, dtype=object)
        self.texts = np.empty(0, dtype=object)
        self.chunk_ids = np.empty(0, dtype=object)
        self.starts = np.empty(0, dtype=np.float64)
        self.ends = np.empty(0, dtype=np.float64)
        self.vectors = np.empty((0, 0), dtype=np.float32)
        # When the last read began: what lands later has an `embedded_at` after it, less the overlap.
        self.checked: datetime | None = None
        self.change: Change | None = None  # the key's change tokens at the last read
        self._row: dict[str, int] = {}
        self.version = _new_version()

    def _merge(self, docs: list[dict]) -> int:
        if not docs:
            return 0
        vectors = np.stack([read_bson_vector(d["embedding"]) for d in docs])
        if vectors.dtype == np.float32:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors /= np.where(norms > 0, norms, 1.0)
        if len(self.ids) and (vectors.shape[1], vectors.dtype) != (self.vectors.shape[1], self.vectors.dtype):
            raise SearchError(f"vector key {self.vector_key} holds {self.vectors.dtype} vectors of "
                              f"{self.vectors.shape[1]} components and {vectors.dtype} ones of {vectors.shape[1]}")
        fresh = [i for i, d in enumerate(docs) if d["_id"] not in self._row]
        known = [(self._row[d["_id"]], i) for i, d in enumerate(docs) if d["_id"] in self._row]
        changed = False
        if known:
            rows, new = (np.array(side) for side in zip(*known, strict=True))
            texts = np.array([docs[i].get("text", "") for i in new], dtype=object)
            # Writes within the overlap are read again at every refresh: only a new vector or text is a change.
            differ = (self.vectors[rows] != vectors[new]).any(axis=1) | (self.texts[rows] != texts)
            self.vectors[rows[differ]] = vectors[new[differ]]
            self.texts[rows[differ]] = texts[differ]
            self.starts[rows[differ]], self.ends[rows[differ]] = _times([docs[i] for i in new[differ]])
            changed = bool(differ.any())
        if fresh:
            base = len(self.ids)
            self._row.update((docs[i]["_id"], base + n) for n, i in enumerate(fresh))
            self.ids = np.concatenate([self.ids, np.array([docs[i]["_id"] for i in fresh], dtype=object)])
            self.episode_ids = np.concatenate(
                [self.episode_ids, np.array([docs[i].get("episode_id") for i in fresh], dtype=object)])
            self.podcasts = np.concatenate(
                [self.podcasts, np.array([docs[i].get("podcast") for i in fresh], dtype=object)])
            self.texts = np.concatenate([self.texts, np.array([docs[i].get("text", "") for i in fresh], dtype=object)])
            self.chunk_ids = np.concatenate(
                [self.chunk_ids, np.array([docs[i]["chunk_id"] for i in fresh], dtype=object)])
            starts, ends = _times([docs[i] for i in fresh])
            self.starts, self.ends = np.concatenate([self.starts, starts]), np.concatenate([self.ends, ends])
            self.vectors = vectors[fresh] if not base else np.concatenate([self.vectors, vectors[fresh]])
        if fresh or changed:
            self.version = _new_version()
        return len(docs)

    def _load(self) -> None:
        if not self.path.is_file():
            return
        try:
            with np.load(self.path, allow_pickle=False) as data:
                if "chunk_ids" not in data.files:
                    logger.info("vector cache %s was written before it kept chunk times: it is read again from "
                                "MongoDB", self.path)
                    return
                ids, episode_ids, podcasts, chunk_ids = (data[name].tolist() for name in (
                    "ids", "episode_ids", "podcasts", "chunk_ids"))
                starts, ends = data["starts"], data["ends"]
                self.vectors = data["vectors"]
                # Texts as one UTF-8 buffer and offsets: a numpy string array pads every text to the longest.
                buffer, offsets = data["texts_utf8"].tobytes(), data["text_offsets"].tolist()
                texts = [buffer[a:b].decode() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
                checked = str(data["checked"])
                self.checked = datetime.fromisoformat(checked) if checked else None
                version = str(data["version"])
                # A file from before tokens: one read.
                token, whole = (str(data[name]) if name in data.files else "" for name in ("token", "whole_token"))
            if not (len(ids) == len(episode_ids) == len(podcasts) == len(texts) == len(chunk_ids) == len(starts)
                    == len(ends) == len(self.vectors)):
                raise ValueError("its arrays differ in length")
        except Exception as exc:  # whatever a damaged file raises: a cut zip, a bad array, a bad date
            # A damaged cache costs one full read, never a wrong answer or a failed search.
            logger.warning("ignoring unreadable vector cache %s (it is read again from MongoDB): %s: %s",
                           self.path, type(exc).__name__, exc)
            self._clear()
            return
        self.ids = np.array(ids, dtype=object)
        self.episode_ids = np.array([e or None for e in episode_ids], dtype=object)
        self.podcasts = np.array([p or None for p in podcasts], dtype=object)
        self.texts = np.array(texts, dtype=object)
        self.chunk_ids = np.array(chunk_ids, dtype=object)
        self.starts, self.ends = starts, ends
        self._row = {chunk_id: i for i, chunk_id in enumerate(ids)}
        self.version = version
        self.change = Change(token, whole or None) if token else None

    def drop(self, podcast: str | None, episode_id: str | None) -> int:
        """Remove the rows of `podcast` (None: of no podcast), of one episode if `episode_id`; how many went."""
        gone = np.array([p == podcast for p in self.podcasts], dtype=bool)
        if episode_id is not None:
            gone &= self.episode_ids == episode_id
        kept = np.flatnonzero(~gone)
        self.ids, self.episode_ids, self.podcasts, self.texts = (
            self.ids[kept], self.episode_ids[kept], self.podcasts[kept], self.texts[kept])
        self.chunk_ids, self.starts, self.ends = self.chunk_ids[kept], self.starts[kept], self.ends[kept]
        self.vectors = self.vectors[kept]
        self._row = {chunk_id: i for i, chunk_id in enumerate(self.ids)}
        self.version = _new_version()
        return int(gone.sum())

    def save(self) -> None:
        """Write the cache to its file (private like the rest of the data folder: it holds every chunk's text)."""
        private_dir(self.path.parent)
        encoded = [t.encode() for t in self.texts]
        offsets = np.cumsum([0, *map(len, encoded)], dtype=np.int64)
        with replacing(self.path) as file:
            np.savez(file, texts_utf8=np.frombuffer(b"".join(encoded), dtype=np.uint8), text_offsets=offsets,
                     ids=self.ids.astype(str), episode_ids=np.array([e or "" for e in self.episode_ids], str),
                     podcasts=np.array([p or "" for p in self.podcasts], str), vectors=self.vectors,
                     chunk_ids=self.chunk_ids.astype(str), starts=self.starts, ends=self.ends,
                     checked=np.array(self.checked.isoformat() if self.checked else ""), version=np.array(self.version),
                     token=np.array(self.change.token if self.change else ""),
                     whole_token=np.array((self.change.whole or "") if self.change else ""))


def cache_path(data_dir: Path, mongo_uri: str, mongo_db: str, vector_key: str) -> Path:
    """One file per server, database and vector key (the URI is hashed, never written out)."""
    return data_dir / "search" / f"{_where(mongo_uri, mongo_db)}-{vector_key}.npz"


def cache_paths(data_dir: Path, mongo_uri: str, mongo_db: str) -> list[Path]:
    """The cache files of one server and database, every vector key's."""
    return sorted((data_dir / "search").glob(f"{_where(mongo_uri, mongo_db)}-*.npz"))


def drop_cached(path: Path, podcast: str | None, episode_id: str | None, *, dry_run: bool = False) -> int:
    """Remove a podcast's (or an episode's) rows from the cache file at `path`; how many went (or would go)."""
    cache = VectorCache(path, path.stem.partition("-")[2], timedelta(0))
    dropped = cache.drop(podcast, episode_id)
    if dropped and not dry_run:
        cache.save()
        # The BM25 index holds the dropped chunks' words: it goes too (the next hybrid search builds it again).
        cache.lexical_path.unlink(missing_ok=True)
    return dropped


def _new_version() -> str:
    return secrets.token_hex(8)


def _where(mongo_uri: str, mongo_db: str) -> str:
    return hashlib.sha256(f"{mongo_uri}\x00{mongo_db}".encode()).hexdigest()[:12]


def _times(docs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """The chunks' start and end times, in seconds."""
    starts = np.array([d["start"] for d in docs], dtype=np.float64)
    return starts, np.array([d["end"] for d in docs], dtype=np.float64)


def _read(embeddings: Collection, query: dict) -> list[dict]:
    try:
        return list(embeddings.find(query, PROJECTION))
    except PyMongoError as exc:
        raise StoreError(f"cannot read vectors from {embeddings.full_name}: {exc}") from exc


def _count(embeddings: Collection, vector_key: str) -> int:
    # A $group count: nx-27017 answers it from the (vector_key, embedded_at) index in milliseconds,
    # while count_documents scans (6 s over 100k documents).
    pipeline = [{"$match": {"vector_key": vector_key}}, {"$group": {"_id": None, "n": {"$sum": 1}}}]
    try:
        found = list(embeddings.aggregate(pipeline))
    except PyMongoError as exc:
        raise StoreError(f"cannot count vectors in {embeddings.full_name}: {exc}") from exc
    return int(found[0]["n"]) if found else 0

