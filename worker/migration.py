"""One-off moves of stored data to the current layout (`podembed migrate`).

Ids moved so far, each from the layout before it:
- vector documents stored before episodes were identified within their podcast have ids
  `{episode_id}:{seq}|{vector key}`; they move to `{episode key}:{seq}|{vector key}`;
- podcast keys of 8 hex digits (and of names not in NFC) move to keys of 16 digits of the NFC
  name, in `embeddings`, `chunks` and the nightly watermarks, and the `podcast` fields to NFC.

Running it again finds nothing to move. Watermark entries keyed by the bare episode id need no
move: nightly reads them as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import PyMongoError

from config.errors import StoreError
from producer.chunkstore import ChunkStore
from producer.jobs import now_iso
from producer.models import embedding_id, episode_key, normal_podcast, podcast_key, slug_key
from worker.store import VectorStore

# Documents moved per round trip (each carries its vector and text).
MOVE_SLICE = 500
# Hex digits of the podcast keys before they had 16.
OLD_KEY_DIGITS = 8


@dataclass
class Migration:
    examined: int = 0  # vector documents
    moved: int = 0
    chunks_examined: int = 0
    chunks_moved: int = 0
    watermark_entries: int = 0  # entries given their new key


def migrate_ids(db: Database) -> Migration:
    """Give every vector and chunk document, and every watermark entry, its id of the current layout."""
    result = Migration()
    names: set[str] = set()
    try:
        result.examined, result.moved = _move(db.embeddings, names, _move_vectors, vectors=True)
        result.chunks_examined, result.chunks_moved = _move(db.chunks, names, _move_chunks, vectors=False)
        result.watermark_entries = _rekey_watermarks(db, names)
    except PyMongoError as exc:
        raise StoreError(f"cannot migrate {db.name}: {exc}") from exc
    return result


# Writes the moved documents under their new ids: (database, old ids, old id -> (chunk id, podcast)) -> new ids.
Move = Callable[[Database, list[str], dict[str, tuple[str, str | None]]], set[str]]


def _move(collection: Collection, names: set[str], move: Move, *, vectors: bool) -> tuple[int, int]:
    """Examine every document of `collection` (of vectors, or of chunks); `move` those whose id or podcast
    is not the current one. Adds the podcast names met, as stored, to `names`."""
    fields = {"episode_id": 1, "podcast": 1, "seq": 1, "vector_key": 1}
    examined = 0
    renames: dict[str, tuple[str, str | None]] = {}
    for doc in collection.find({}, fields):
        examined += 1
        stored = doc.get("podcast")
        podcast = normal_podcast(stored)
        if stored is not None:
            names.add(stored)
        chunk_id = f"{episode_key(podcast, doc['episode_id'])}:{doc['seq']}"
        new_id = embedding_id(chunk_id, doc["vector_key"]) if vectors else chunk_id
        if doc["_id"] != new_id or stored != podcast:
            renames[doc["_id"]] = (chunk_id, podcast)
    old_ids = list(renames)
    for start in range(0, len(old_ids), MOVE_SLICE):
        moving = old_ids[start : start + MOVE_SLICE]
        # The new documents first: an interrupted move leaves a copy, never a loss, and a rerun ends it.
        moved_to = move(collection.database, moving, renames)
        collection.delete_many({"_id": {"$in": [i for i in moving if i not in moved_to]}})
    return examined, len(old_ids)


def _move_vectors(db: Database, old_ids: list[str], renames: dict[str, tuple[str, str | None]]) -> set[str]:
    docs = [{**doc, "_id": embedding_id(renames[doc["_id"]][0], doc["vector_key"]), "chunk_id": renames[doc["_id"]][0],
             "podcast": renames[doc["_id"]][1]} for doc in db.embeddings.find({"_id": {"$in": old_ids}})]
    # Moved: search caches read their keys whole, as the moved documents keep their times.
    VectorStore(db).upsert(docs, moved=True)
    return {doc["_id"] for doc in docs}


def _move_chunks(db: Database, old_ids: list[str], renames: dict[str, tuple[str, str | None]]) -> set[str]:
    store = ChunkStore(db)
    chunks = [replace(c, chunk_id=renames[c.chunk_id][0], podcast=renames[c.chunk_id][1])
              for c in store.load(old_ids)]
    store.write(chunks)
    return {c.chunk_id for c in chunks}


def _rekey_watermarks(db: Database, names: set[str]) -> int:
    """Watermark entries keyed by an old podcast key of a name met in `embeddings` or `chunks` take the new key."""
    new_keys = {slug_key(name, OLD_KEY_DIGITS): podcast_key(name) for name in names}
    rekeyed = 0
    for doc in db.watermarks.find({}, {"episodes": 1}):
        # By kind and key: an entry of a name in NFD and one of the same name in NFC become one.
        entries: dict[tuple[int, str], list] = {}
        changed = 0
        for entry in doc["episodes"]:
            key, slash, episode_id = entry[0].partition("/")
            if len(entry) == 3 and slash and key in new_keys:
                entry = [f"{new_keys[key]}/{episode_id}", *entry[1:]]
                changed += 1
            entries[len(entry), entry[0]] = entry
        if changed:
            db.watermarks.update_one({"_id": doc["_id"]},
                                     {"$set": {"episodes": sorted(entries.values()), "updated_at": now_iso()}})
            rekeyed += changed
    return rekeyed
