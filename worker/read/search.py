"""Search the stored vectors: the query is embedded under the stored vectors' own vector key.

Two engines answer behind one interface. `AtlasSearch` runs `$vectorSearch` where the server
has a queryable Atlas Vector Search index (`podembed index` creates it). `ExactScan` is the
exact cosine over a local `VectorCache` everywhere else (the local nx-27017, a MongoDB without
mongot, or Atlas before the index exists). Both return cosine similarities.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Protocol

import numpy as np
from pymongo import ASCENDING
from pymongo.database import Database
from pymongo.errors import OperationFailure, PyMongoError
from pymongo.operations import SearchIndexModel

from config.errors import SearchError, StoreError
from config.settings import Settings
from producer.enqueue import vector_spec
from producer.models import VectorSpec, normal_podcast
from worker.read.lexical import FUSION_DEPTH, LexicalIndex, fuse, lexical_index
from worker.read.vector_cache import HIT_FIELDS, VectorCache, cache_path
from worker.store import from_bson_vector, to_bson_vector

logger = logging.getLogger(__name__)

# The INSTRUCTOR paper's retrieval style: the query side names its task as the document side does.
INSTRUCTOR_QUERY_INSTRUCTION = "Represent the podcast question for retrieving relevant transcript passages:"
MAX_K = 1000
# Query vectors scored against the cache at once: bounds the score matrix (64 x 100k floats: 25 MB).
QUERY_BLOCK = 64
# Atlas advises numCandidates of 10 to 20 times the limit for good recall; it allows at most 10,000.
# A quantized index ranks its candidates by the reduced vectors before rescoring them with the full ones:
# more of them for the coarser forms (binary keeps one bit a dimension).
CANDIDATES_PER_RESULT = {"none": 20, "scalar": 30, "binary": 60}
MAX_CANDIDATES = 10_000
# Atlas Vector Search's `quantization` of a float vector field: none, scalar (int8) or binary (one bit).
QUANTIZATIONS = ("none", "scalar", "binary")
# Binary vectors: how many candidates per result the Hamming scan hands to the float rescoring.
BINARY_RESCORE = 10
# Stored rows widened to float32 at once for the int8 scan (numpy has no int8 matrix product): 16 MB at 384-d.
INT8_ROWS = 10_000


@dataclass
class Hit:
    chunk_id: str
    episode_id: str | None
    podcast: str | None
    start: float
    end: float
    score: float
    text: str

    def to_dict(self) -> dict:
        return asdict(self)


class Engine(Protocol):
    name: str

    def refresh(self) -> None:
        """Get ready to answer from what is stored now; refuse before any query is embedded."""
        ...

    def search(self, vectors: np.ndarray, k: int, podcast: str | None, episode_id: str | None
               ) -> list[list[tuple[str, float]]]:
        """For each query vector, the `_id`s of the best `k` stored vectors and their cosine, best first."""
        ...

    def lexical(self, queries: list[str], k: int, podcast: str | None, episode_id: str | None) -> list[list[str]]:
        """For each query, the `_id`s of the best `k` chunks by BM25, best first."""
        ...

    def chunks(self, ids: list[str]) -> dict[str, dict]:
        """The fields of a hit (HIT_FIELDS) of the stored chunks of these `_id`s that are there, by `_id`."""
        ...


def query_instruction(settings: Settings) -> str:
    """The configured query instruction, or the default: INSTRUCTOR's retrieval style, none for others."""
    if settings.query_instruction is not None:
        return settings.query_instruction
    return INSTRUCTOR_QUERY_INSTRUCTION if settings.is_instructor() else ""


class ExactScan:
    """Exact cosine over the local cache of one vector key; refreshed before each search call."""

    name = "exact"

    def __init__(self, settings: Settings, db: Database, vector_key: str) -> None:
        self.embeddings = db.embeddings
        try:
            # The incremental refresh reads by vector key and embedding time.
            self.embeddings.create_index([("vector_key", ASCENDING), ("embedded_at", ASCENDING)])
        except PyMongoError as exc:
            raise StoreError(f"cannot index {self.embeddings.full_name}: {exc}") from exc
        self.cache = VectorCache(cache_path(settings.data_dir, settings.mongo_uri, settings.mongo_db, vector_key),
                                 vector_key, timedelta(seconds=settings.search_refresh_overlap_s))
        self._lexical: LexicalIndex | None = None
        self._norms: tuple[str, np.ndarray] | None = None
        self.rescore = BINARY_RESCORE

    def refresh(self) -> None:
        self.cache.refresh(self.embeddings)
        if not len(self.cache):
            raise SearchError(f"no vectors stored under vector key {self.cache.vector_key} (this model and "
                              f"instruction): ingest or backfill first")

    def search(self, vectors: np.ndarray, k: int, podcast: str | None, episode_id: str | None
               ) -> list[list[tuple[str, float]]]:
        rows = self.cache.rows(podcast, episode_id)
        matrix = self.cache.vectors if rows is None else self.cache.vectors[rows]
        ids = self.cache.ids if rows is None else self.cache.ids[rows]
        if not len(ids):
            return [[] for _ in vectors]
        stored_dims = matrix.shape[1] * 8 if matrix.dtype == np.uint8 else matrix.shape[1]
        if not 0 <= stored_dims - vectors.shape[1] < (8 if matrix.dtype == np.uint8 else 1):
            raise SearchError(f"query vectors have {vectors.shape[1]} dimensions, stored ones {stored_dims}")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        queries = (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)
        scale = None
        if matrix.dtype == np.int8:
            scale = self._inverse_norms() if rows is None else self._inverse_norms()[rows]
        out: list[list[tuple[str, float]]] = []
        top = min(k, len(ids))
        # Binary: the Hamming ranking's best `rescore` x k are scored again against the float query.
        wide = min(len(ids), top * self.rescore) if matrix.dtype == np.uint8 and self.rescore else top
        for block in range(0, len(queries), QUERY_BLOCK):
            part = queries[block:block + QUERY_BLOCK]
            scores = _scores(part, matrix, scale)
            best = np.argpartition(-scores, wide - 1, axis=1)[:, :wide]
            for query, row, candidates in zip(part, scores, best, strict=True):
                if wide != top:
                    row = np.full(len(ids), -np.inf, dtype=np.float32)
                    row[candidates] = _signs(matrix[candidates], len(query)) @ query
                    candidates = candidates[np.argpartition(-row[candidates], top - 1)[:top]]
                ranked = candidates[np.lexsort((candidates, -row[candidates]))]
                out.append([(ids[i], float(row[i])) for i in ranked])
        return out

    def _inverse_norms(self) -> np.ndarray:
        """1 / the length of each int8 row, kept until the cache changes."""
        if self._norms is None or self._norms[0] != self.cache.version:
            lengths = np.sqrt(np.einsum("ij,ij->i", self.cache.vectors, self.cache.vectors, dtype=np.float32))
            self._norms = (self.cache.version, 1.0 / np.where(lengths > 0, lengths, 1.0))
        return self._norms[1]

    def lexical(self, queries: list[str], k: int, podcast: str | None, episode_id: str | None) -> list[list[str]]:
        if self._lexical is None or self._lexical.version != self.cache.version:
            # Read from beside the cache file, or built on the first hybrid query after the cache changed.
            self._lexical = lexical_index(self.cache.lexical_path, self.cache.texts, self.cache.version)
        rows = self.cache.rows(podcast, episode_id)
        return [self.cache.ids[self._lexical.rank(query, rows, k)].tolist() for query in queries]

    def chunks(self, ids: list[str]) -> dict[str, dict]:
        # From the rows the scan read: no round trip to MongoDB.
        return {doc_id: fields for doc_id in ids if (fields := self.cache.hit_fields(doc_id)) is not None}


class AtlasSearch:
    """`$vectorSearch` on an Atlas Vector Search index, filtered on the vector key."""

    name = "atlas"

    def __init__(self, db: Database, index: str, vector_key: str, quantization: str = "none") -> None:
        self.embeddings = db.embeddings
        self.index = index
        self.vector_key = vector_key
        self.quantization = quantization

    def refresh(self) -> None:
        """Atlas keeps its index up to date itself."""

    def search(self, vectors: np.ndarray, k: int, podcast: str | None, episode_id: str | None
               ) -> list[list[tuple[str, float]]]:
        out = []
        for vector in vectors:
            pipeline = atlas_pipeline(self.index, vector, k, self.vector_key, podcast, episode_id,
                                      quantization=self.quantization)
            try:
                found = list(self.embeddings.aggregate(pipeline))
            except PyMongoError as exc:
                raise StoreError(f"$vectorSearch on index {self.index!r} failed: {exc}") from exc
            # Atlas scales cosine and dot product to [0, 1] as (1 + x) / 2: give back the cosine.
            out.append([(doc["_id"], 2.0 * doc["score"] - 1.0) for doc in found])
        return out

    def lexical(self, queries: list[str], k: int, podcast: str | None, episode_id: str | None) -> list[list[str]]:
        raise SearchError("hybrid search runs on the exact scan; on Atlas, fuse $vectorSearch with $search in "
                          "$rankFusion (see the README)")

    def chunks(self, ids: list[str]) -> dict[str, dict]:
        try:
            return {d["_id"]: d for d in self.embeddings.find({"_id": {"$in": ids}}, HIT_FIELDS)}
        except PyMongoError as exc:
            raise StoreError(f"cannot read chunks from {self.embeddings.full_name}: {exc}") from exc


def _scores(queries: np.ndarray, matrix: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """Cosine of unit `queries` with every stored row: float32 rows are unit vectors, int8 rows are scaled by
    `scale` (1 / their length), binary rows score 1 - 2 x Hamming distance / dimensions with the query's signs."""
    if matrix.dtype == np.float32:
        return queries @ matrix.T
    if matrix.dtype == np.int8:
        scores = np.empty((len(queries), len(matrix)), dtype=np.float32)
        for start in range(0, len(matrix), INT8_ROWS):
            block = matrix[start:start + INT8_ROWS]
            scores[:, start:start + len(block)] = queries @ block.T.astype(np.float32)
        return scores * scale
    # 64-bit words where the row width allows: eight times fewer XORs and bit counts.
    words = matrix.view(np.uint64) if matrix.shape[1] % 8 == 0 and matrix.flags.c_contiguous else matrix
    bits = np.packbits(queries > 0, axis=1)
    bits = bits.view(np.uint64) if words.dtype == np.uint64 else bits
    distance = np.stack([np.bitwise_count(words ^ q).sum(axis=1, dtype=np.int32) for q in bits])
    return 1.0 - 2.0 * distance.astype(np.float32) / queries.shape[1]


def _signs(packed: np.ndarray, dims: int) -> np.ndarray:
    """Packed bits as unit vectors of -1/+1 components."""
    return (np.unpackbits(packed, axis=1)[:, :dims].astype(np.float32) * 2 - 1) / np.sqrt(dims)


def atlas_pipeline(index: str, vector: np.ndarray, k: int, vector_key: str, podcast: str | None,
                   episode_id: str | None, *, quantization: str = "none") -> list[dict]:
    """The `$vectorSearch` stage for one query vector and the score projection; `numCandidates` grows with how
    coarse the index's quantization is."""
    conditions: list[dict] = [{"vector_key": {"$eq": vector_key}}]
    if podcast is not None:
        conditions.append({"podcast": {"$eq": podcast}})
    if episode_id is not None:
        conditions.append({"episode_id": {"$eq": episode_id}})
    return [
        {"$vectorSearch": {
            "index": index, "path": "embedding", "queryVector": to_bson_vector(vector),
            "numCandidates": min(MAX_CANDIDATES, max(100, CANDIDATES_PER_RESULT[quantization] * k)), "limit": k,
            "filter": conditions[0] if len(conditions) == 1 else {"$and": conditions},
        }},
        {"$project": {"_id": 1, "score": {"$meta": "vectorSearchScore"}}},
    ]


def open_engine(settings: Settings, db: Database, vector_key: str) -> Engine:
    """Atlas where the server lists our vector search index as queryable; the exact scan otherwise."""
    try:
        indexes = list(db.embeddings.list_search_indexes(settings.vector_index))
    except OperationFailure:
        indexes = []  # a server without search indexes at all
    except PyMongoError as exc:
        raise StoreError(f"cannot reach {db.name}.embeddings: {exc}") from exc
    for index in indexes:
        if index.get("type") == "vectorSearch" and index.get("queryable") is True:
            fields = (index.get("latestDefinition") or {}).get("fields") or [{}]
            quantization = next((f.get("quantization") for f in fields if f.get("type") == "vector"), None)
            return AtlasSearch(db, settings.vector_index, vector_key,
                               quantization if quantization in QUANTIZATIONS else "none")
    return ExactScan(settings, db, vector_key)


class Searcher:
    """Embeds queries as the stored vectors were embedded and asks the engine for the best chunks."""

    def __init__(self, settings: Settings, db: Database, *, model: str | None = None,
                 instruction: str | None = None) -> None:
        if model and model != settings.model:
            settings = settings.replace(model=model, model_path=None)
        self.settings = settings
        self.db = db
        self.spec: VectorSpec = vector_spec(settings, instruction)
        self.query_instruction = query_instruction(settings)
        self.engine = open_engine(settings, db, self.spec.key)
        # Hybrid by default where the engine can: the exact scan holds the texts BM25 needs.
        self.hybrid = settings.search_hybrid if settings.search_hybrid is not None else self.engine.name == "exact"

    def search(self, queries: list[str], k: int = 10, *, podcast: str | None = None,
               episode_id: str | None = None, hybrid: bool | None = None) -> list[list[Hit]]:
        """The best `k` chunks for each query, best first.

        `hybrid` fuses the dense ranking with BM25's by reciprocal rank; the score is then the fused one
        (None: `self.hybrid`).
        """
        if not 1 <= k <= MAX_K:
            raise SearchError(f"k must be between 1 and {MAX_K}, got {k}")
        texts = [q.strip() for q in queries]
        empty = [n for n, t in enumerate(texts, 1) if not t]
        if empty:
            raise SearchError(f"empty query (query {empty[0]} of {len(texts)})")
        if not texts:
            return []
        podcast = normal_podcast(podcast)  # as ingest stored it
        self.engine.refresh()
        if not (self.hybrid if hybrid is None else hybrid):
            return self._hits(self.engine.search(self.encode(texts), k, podcast, episode_id))
        lexical = self.engine.lexical(texts, FUSION_DEPTH, podcast, episode_id)
        dense = self.engine.search(self.encode(texts), FUSION_DEPTH, podcast, episode_id)
        return self._hits([fuse([[doc_id for doc_id, _ in d], words], k)
                           for d, words in zip(dense, lexical, strict=True)])

    def encode(self, texts: list[str]) -> np.ndarray:
        # Imported here: the HTTP API and the index command load no model until a query comes.
        from worker.embedder import get_embedder

        s = self.settings
        embedder = get_embedder(s.model_source(), revision=self.spec.revision,
                                pool_instruction=self.spec.pool_instruction, device=s.device,
                                micro_batch_size=s.micro_batch_size, max_forward_tokens=s.max_forward_tokens)
        # Character counts stand in for token counts: they only sort queries into micro-batches.
        vectors, _ = embedder.encode(texts, [len(t) for t in texts], instruction=self.query_instruction,
                                     normalize=self.spec.normalize)
        return vectors

    def _hits(self, ranked: list[list[tuple[str, float]]]) -> list[list[Hit]]:
        docs = self.engine.chunks(list({doc_id for hits in ranked for doc_id, _ in hits}))
        # A chunk deleted between the scan and this read is left out rather than shown empty.
        return [[Hit(chunk_id=d["chunk_id"], episode_id=d.get("episode_id"), podcast=d.get("podcast"),
                     start=d["start"], end=d["end"], score=round(score, 6), text=d["text"])
                 for doc_id, score in hits if (d := docs.get(doc_id)) is not None]
                for hits in ranked]


def index_definition(settings: Settings, db: Database, spec: VectorSpec, quantization: str = "none") -> dict:
    """The Atlas Vector Search index for the stored vectors of `spec`: dimensions and norm read from them, with
    Atlas's automatic `quantization` of float32 vectors (none, scalar or binary)."""
    if quantization not in QUANTIZATIONS:
        raise SearchError(f"unknown quantization {quantization!r} (one of {', '.join(QUANTIZATIONS)})")
    if quantization != "none" and spec.dtype != "float32":
        raise SearchError(f"the vectors are stored as {spec.dtype} already: Atlas quantizes only float32 vectors "
                          "(use --quantization none, or store float32 with PODEMBED_VECTOR_DTYPE=float32)")
    try:
        sample = [from_bson_vector(d["embedding"])
                  for d in db.embeddings.find({"vector_key": spec.key}, {"embedding": 1}).limit(200)]
    except PyMongoError as exc:
        raise StoreError(f"cannot read vectors from {db.name}.embeddings: {exc}") from exc
    if not sample:
        raise SearchError(f"no vectors stored for {spec.model} (vector key {spec.key}): ingest or backfill first")
    dims = {len(v) for v in sample}
    if len(dims) > 1:
        raise SearchError(f"vector key {spec.key} holds vectors of {sorted(dims)} dimensions")
    # Unit vectors: dot product is the cosine, and Atlas computes it faster. Atlas indexes int1 (packed bit)
    # vectors by euclidean distance only: for ±1 vectors it ranks as cosine does.
    unit = all(abs(float(np.linalg.norm(v)) - 1.0) < 1e-3 for v in sample)
    similarity = "euclidean" if spec.dtype == "binary" else "dotProduct" if unit else "cosine"
    vector = {"type": "vector", "path": "embedding", "numDimensions": dims.pop(), "similarity": similarity}
    if quantization != "none":  # Atlas's default: the definition without it is the one stored before
        vector["quantization"] = quantization
    return {
        "name": settings.vector_index,
        "type": "vectorSearch",
        "definition": {"fields": [
            vector,
            {"type": "filter", "path": "vector_key"},
            {"type": "filter", "path": "podcast"},
            {"type": "filter", "path": "episode_id"},
        ]},
    }


def create_index(db: Database, definition: dict) -> str:
    """Create the index, or update its definition if one of that name exists; 'created' or 'updated'.

    A server that cannot run `$vectorSearch` (nx-27017, MongoDB without mongot) is refused
    first: some accept a search index definition they can never use.
    """
    dims = definition["definition"]["fields"][0]["numDimensions"]
    probe = np.zeros(dims, dtype=np.float32)
    probe[0] = 1.0
    try:
        list(db.embeddings.aggregate(atlas_pipeline(definition["name"], probe, 1, "", None, None)))
    except OperationFailure as exc:
        reason = (exc.details or {}).get("errmsg") or str(exc)
        raise SearchError(f"this server has no Atlas Vector Search ({reason}): nothing to create; "
                          f"podembed search uses the exact scan here") from None
    except PyMongoError as exc:
        raise StoreError(f"cannot reach {db.name}.embeddings: {exc}") from exc
    try:
        if list(db.embeddings.list_search_indexes(definition["name"])):
            db.embeddings.update_search_index(definition["name"], definition["definition"])
            return "updated"
        db.embeddings.create_search_index(SearchIndexModel(definition=definition["definition"],
                                                           name=definition["name"], type="vectorSearch"))
    except PyMongoError as exc:
        raise StoreError(f"cannot create search index {definition['name']!r}: {exc}") from exc
    return "created"
