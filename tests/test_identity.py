"""Episodes are identified within their podcast: two shows' `E01` never touch each other's vectors,
ledger or watermark; ids of the older layout migrate; cancelled or failed nightly work is redone."""

from __future__ import annotations

import json
import shutil
import unicodedata
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pymongo.database import Database
from redis import Redis

from config.settings import Settings
from producer.chunkstore import ChunkStore
from producer.enqueue import ingest, parse_files, vector_spec
from producer.jobs import JobRecords
from producer.models import episode_key, podcast_key, slug_key
from producer.operations import cancel, nightly
from producer.sources import DirectorySource
from tests.conftest import DATA, EXAMPLES
from tests.test_operations import _cli
from worker.loop import run_worker
from worker.migration import migrate_ids
from worker.read.search import ExactScan

SHOW = "The Seen and the Unseen"
OTHER = "Cooking Weekly"


def _ingest_and_drain(settings: Settings, redis: Redis, db: Database, path: Path, podcast: str) -> str:
    episodes, refused = parse_files([path], podcast=podcast)
    assert not refused
    job = ingest(settings, redis, db, episodes, kind="ingest")
    run_worker(settings, burst=True, redis=redis)
    return job.job_id


def test_same_episode_id_in_two_podcasts_keeps_both(settings: Settings, redis: Redis, db: Database,
                                                    tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    shutil.copy(DATA / "E03.txt", tmp_path / "other" / "E05.txt")
    first = _ingest_and_drain(settings, redis, db, EXAMPLES / "E05.vtt", SHOW)
    before = {d["_id"]: d for d in db.embeddings.find({})}
    second = _ingest_and_drain(settings, redis, db, tmp_path / "other" / "E05.txt", OTHER)

    records = JobRecords(redis, db, settings.result_ttl)
    one, two = records.status(first), records.status(second)
    assert one.state == two.state == "finished"
    assert (two.chunks.embedded, two.chunks.skipped) == (two.chunks.total, 0)
    docs = {d["_id"]: d for d in db.embeddings.find({})}
    assert len(docs) == one.chunks.total + two.chunks.total
    for doc_id, doc in before.items():  # the first show's vectors are untouched
        assert docs[doc_id]["podcast"] == SHOW and docs[doc_id]["job_id"] == first
        assert docs[doc_id]["embedding"] == doc["embedding"]
    theirs = [d for d in docs.values() if d["podcast"] == OTHER]
    assert len(theirs) == two.chunks.total
    assert {d["episode_id"] for d in docs.values()} == {"E05"}
    assert all(d["chunk_id"].startswith(episode_key(OTHER, "E05") + ":") for d in theirs)
    # Each show's ledger entries name only its own job.
    assert {e["job_id"] for e in db.batches.find({})} == {first, second}


def test_same_file_twice_under_the_same_podcast_is_skipped(settings: Settings, redis: Redis, db: Database) -> None:
    _ingest_and_drain(settings, redis, db, EXAMPLES / "E05.vtt", SHOW)
    n_docs = db.embeddings.count_documents({})
    again = _ingest_and_drain(settings, redis, db, EXAMPLES / "E05.vtt", SHOW)
    status = JobRecords(redis, db, settings.result_ttl).status(again)
    assert (status.state, status.chunks.skipped, status.chunks.embedded) == ("finished", status.chunks.total, 0)
    assert db.embeddings.count_documents({}) == n_docs


def test_nightly_on_one_folder_per_podcast(settings: Settings, redis: Redis, db: Database, tmp_path: Path) -> None:
    for show, transcript in (("ShowA", EXAMPLES / "E05.vtt"), ("ShowB", DATA / "E03.txt")):
        (tmp_path / show).mkdir()
        shutil.copy(transcript, tmp_path / show / "E01.vtt" if transcript.suffix == ".vtt" else
                    tmp_path / show / "E01.txt")
    first = nightly(settings, redis, db, DirectorySource(tmp_path))
    assert (first.refused, first.episodes, first.unchanged) == ([], 2, 0)
    run_worker(settings, burst=True, redis=redis)
    assert {d["podcast"] for d in db.embeddings.find({})} == {"ShowA", "ShowB"}

    # A change to ShowB's E01 takes only ShowB's E01 again.
    changed = tmp_path / "ShowB" / "E01.txt"
    changed.write_text(changed.read_text() + "\n\nA closing paragraph, added later.\n")
    second = nightly(settings, redis, db, DirectorySource(tmp_path))
    assert (second.episodes, second.unchanged) == (1, 1)
    run_worker(settings, burst=True, redis=redis)
    ids = [d["chunk_id"] for d in db.embeddings.find({"job_id": second.job_id})]
    assert ids and all(i.startswith(episode_key("ShowB", "E01") + ":") for i in ids)


def test_migrate_moves_ids_of_the_older_layout(settings: Settings, redis: Redis, db: Database) -> None:
    _ingest_and_drain(settings, redis, db, EXAMPLES / "E05.vtt", SHOW)
    current = {d["_id"]: d for d in db.embeddings.find({})}
    # The same documents as the older layout stored them: ids of the episode id alone.
    spec_key = vector_spec(settings).key
    db.embeddings.delete_many({})
    # Embedded a day ago: older than any refresh's overlap, as data of an older layout is.
    day_ago = datetime.now(UTC) - timedelta(days=1)
    db.embeddings.insert_many([{**d, "_id": f"E05:{d['seq']}|{spec_key}", "chunk_id": f"E05:{d['seq']}",
                                "embedded_at": day_ago} for d in current.values()])
    scan = ExactScan(settings, db, spec_key)  # a search cache of the older ids, read before the move
    scan.refresh()
    assert set(scan.cache.ids) == {f"E05:{d['seq']}|{spec_key}" for d in current.values()}

    done = _cli(settings, "migrate", "--json")
    assert done.returncode == 0, done.stderr
    # No chunk texts left to move: each batch deleted its own once its vectors were stored.
    assert json.loads(done.stdout) == {"examined": len(current), "moved": len(current), "chunks_examined": 0,
                                       "chunks_moved": 0, "watermark_entries": 0}
    migrated = {d["_id"]: d for d in db.embeddings.find({})}
    assert migrated.keys() == current.keys()
    for doc_id, doc in current.items():
        assert migrated[doc_id]["chunk_id"] == doc["chunk_id"] and migrated[doc_id]["embedding"] == doc["embedding"]
    assert migrate_ids(db).moved == 0
    # The move kept every count and time: the cache knows of it by the key's `whole` token, and reads it whole.
    scan.refresh()
    assert set(scan.cache.ids) == current.keys()

    # Re-ingesting the same file finds every vector in place.
    again = _ingest_and_drain(settings, redis, db, EXAMPLES / "E05.vtt", SHOW)
    assert JobRecords(redis, db, settings.result_ttl).status(again).chunks.skipped == len(current)
    assert db.embeddings.count_documents({}) == len(current)


def test_cli_ingest_episode_id(settings: Settings, redis: Redis, db: Database, tmp_path: Path) -> None:
    out = _cli(settings, "ingest", str(DATA / "E03.txt"), "--podcast", OTHER, "--episode-id", "ep-42", "--json")
    assert out.returncode == 0, out.stderr
    run_worker(settings, burst=True, redis=redis)
    docs = list(db.embeddings.find({}))
    assert len(docs) == json.loads(out.stdout)["chunks"] > 0
    assert {(d["podcast"], d["episode_id"]) for d in docs} == {(OTHER, "ep-42")}

    several = _cli(settings, "ingest", str(DATA / "E03.txt"), str(EXAMPLES / "E05.vtt"), "--episode-id", "x")
    assert several.returncode == 1
    assert "--episode-id names the episode of a single file" in several.stderr


def test_cancelled_nightly_is_taken_again(settings: Settings, redis: Redis, db: Database, tmp_path: Path) -> None:
    shutil.copy(DATA / "E03.txt", tmp_path / "E03.txt")
    first = nightly(settings, redis, db, DirectorySource(tmp_path))
    assert cancel(settings, redis, db, first.job_id).state == "cancelled"

    again = nightly(settings, redis, db, DirectorySource(tmp_path))
    assert (again.episodes, again.chunks, again.unchanged) == (1, first.chunks, 0)
    run_worker(settings, burst=True, redis=redis)
    assert JobRecords(redis, db, settings.result_ttl).status(again.job_id).state == "finished"
    # Done now: the next run leaves it.
    assert nightly(settings, redis, db, DirectorySource(tmp_path)).unchanged == 1


def test_nightly_with_a_batch_failed_for_good_is_taken_again(settings: Settings, redis: Redis, db: Database,
                                                            tmp_path: Path) -> None:
    shutil.copy(DATA / "E03.txt", tmp_path / "E03.txt")
    first = nightly(settings, redis, db, DirectorySource(tmp_path))
    # A worker that cannot fit a single text in a forward pass: the model refuses the batch for good.
    run_worker(settings.replace(max_forward_tokens=1), burst=True, redis=redis)
    assert JobRecords(redis, db, settings.result_ttl).status(first.job_id).state == "failed"

    again = nightly(settings, redis, db, DirectorySource(tmp_path))
    assert (again.episodes, again.chunks, again.unchanged) == (1, first.chunks, 0)
    run_worker(settings, burst=True, redis=redis)
    assert JobRecords(redis, db, settings.result_ttl).status(again.job_id).state == "finished"


def _old_key(key: str, names: dict[str, str]) -> str:
    """`key` (an episode key, or a chunk id, or a vector id) as the 8-digit layout wrote it for the name in `names`."""
    podcast, slash, rest = key.partition("/")
    return f"{slug_key(names[podcast], 8)}{slash}{rest}" if podcast in names else key


def test_migrate_moves_8_digit_keys_and_names_not_in_nfc(settings: Settings, redis: Redis, db: Database,
                                                          tmp_path: Path) -> None:
    show = "Café Olé"
    typed = unicodedata.normalize("NFD", show)
    (tmp_path / show).mkdir()
    shutil.copy(EXAMPLES / "E05.vtt", tmp_path / show / "E05.vtt")
    shutil.copy(DATA / "E03.txt", tmp_path / "E03.txt")
    assert nightly(settings, redis, db, DirectorySource(tmp_path)).episodes == 2
    run_worker(settings, burst=True, redis=redis)
    # The texts queued again (jobs not yet drained hold them in `chunks`), so that migrate moves them too.
    store = ChunkStore(db)
    store.write(store.load(sorted(d["chunk_id"] for d in db.embeddings.find({})), vector_spec(settings)))
    current = {name: {d["_id"]: d for d in db[name].find({})} for name in ("embeddings", "chunks")}
    (watermark,) = db.watermarks.find({})
    assert len(podcast_key(show).rpartition(".")[2]) == 16

    # The same data as the layout before wrote it, with the show named in NFD (as a Mac file system
    # names folders): 8-digit keys of that spelling in every id, chunk id and watermark entry.
    names = {podcast_key(show): typed}
    for name, docs in current.items():
        db[name].delete_many({})
        db[name].insert_many([{**d, "_id": _old_key(d["_id"], names), "podcast": typed if d["podcast"] else None,
                               **({"chunk_id": _old_key(d["chunk_id"], names)} if "chunk_id" in d else {})}
                              for d in docs.values()])
    old_entries = [[_old_key(e[0], names), *e[1:]] for e in watermark["episodes"]]
    db.watermarks.update_one({"_id": watermark["_id"]}, {"$set": {"episodes": old_entries}})
    ours = sum(d["podcast"] == show for d in current["embeddings"].values())
    assert ours and ours < len(current["embeddings"])

    done = _cli(settings, "migrate", "--json")
    assert done.returncode == 0, done.stderr
    n = len(current["embeddings"])
    assert json.loads(done.stdout) == {"examined": n, "moved": ours, "chunks_examined": len(current["chunks"]),
                                       "chunks_moved": ours, "watermark_entries": 1}
    for name, docs in current.items():
        migrated = {d["_id"]: d for d in db[name].find({})}
        assert migrated.keys() == docs.keys()
        assert all(migrated[i]["podcast"] == docs[i]["podcast"] and migrated[i]["text"] == docs[i]["text"]
                   for i in docs)
    assert db.watermarks.find_one({})["episodes"] == watermark["episodes"]
    assert migrate_ids(db).moved == 0

    # Nothing is taken again, and the show typed either way finds its vectors in place.
    assert nightly(settings, redis, db, DirectorySource(tmp_path)).episodes == 0
    again = _ingest_and_drain(settings, redis, db, EXAMPLES / "E05.vtt", typed)
    assert JobRecords(redis, db, settings.result_ttl).status(again).chunks.skipped == ours
