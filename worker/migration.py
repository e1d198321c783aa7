"""One-off moves of stored data to the current layout (`podembed migrate`).

Vector documents stored before episodes were identified within their podcast have ids
`{episode_id}:{seq}|{vector key}`; they move to `{episode key}:{seq}|{vector key}`. Running
it again finds nothing to move. Watermarks need no move: nightly reads their old entries.
"""

from __future__ import annotations

from dataclasses import dataclass

from pymongo.database import Database
from pymongo.errors import PyMongoError

from config.errors import StoreError
from producer.models import embedding_id, episode_key
from worker.store import VectorStore

# Documents moved per round trip (each carries its vector and text).
MOVE_SLICE = 500


@dataclass
class Migration:
    examined: int = 0
    moved: int = 0


def migrate_ids(db: Database) -> Migration:
    """Give every vector document with an id of the old form its id within its podcast."""
    store = VectorStore(db)
    fields = {"chunk_id": 1, "episode_id": 1, "podcast": 1, "seq": 1, "vector_key": 1}
    result = Migration()
    try:
        renames: dict[str, str] = {}
        for doc in db.embeddings.find({}, fields):
            result.examined += 1
            chunk_id = f"{episode_key(doc.get('podcast'), doc['episode_id'])}:{doc['seq']}"
            if doc["chunk_id"] != chunk_id:
                renames[doc["_id"]] = chunk_id
        old_ids = list(renames)
        for start in range(0, len(old_ids), MOVE_SLICE):
            moving = list(db.embeddings.find({"_id": {"$in": old_ids[start : start + MOVE_SLICE]}}))
            # The new document first: an interrupted move leaves a copy, never a loss, and a rerun ends it.
            store.upsert([{**doc, "_id": embedding_id(renames[doc["_id"]], doc["vector_key"]),
                           "chunk_id": renames[doc["_id"]]} for doc in moving])
            db.embeddings.delete_many({"_id": {"$in": [doc["_id"] for doc in moving]}})
            result.moved += len(moving)
    except PyMongoError as exc:
        raise StoreError(f"cannot migrate {db.name}.embeddings: {exc}") from exc
    return result
