"""`podembed export` and `podembed delete` on real transcripts of two podcasts that share an episode id."""

from __future__ import annotations

import json
import shutil
import unicodedata
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pymongo.database import Database
from redis import Redis

from config.settings import Settings
from producer.chunkstore import ChunkStore
from producer.enqueue import vector_spec
from producer.models import episode_key
from producer.operations import nightly
from producer.sources import DirectorySource
from tests.conftest import DATA, EXAMPLES
from tests.test_cli import _run
from worker.loop import run_worker
from worker.read.vector_cache import VectorCache, cache_path
from worker.store import from_bson_vector

SHOW = "The Seen and the Unseen"
OTHER = "Cooking Weekly"


def _two_podcasts(settings: Settings, redis: Redis, db: Database, root: Path) -> DirectorySource:
    """One folder per podcast, both with an `E01`; embedded by a nightly run (so a watermark exists)."""
    (root / SHOW).mkdir(parents=True)
    (root / OTHER).mkdir()
    shutil.copy(EXAMPLES / "E01.vtt", root / SHOW / "E01.vtt")
    shutil.copy(EXAMPLES / "E05.vtt", root / SHOW / "E05.vtt")
    shutil.copy(DATA / "E03.txt", root / OTHER / "E01.txt")
    source = DirectorySource(root)
    assert nightly(settings, redis, db, source).episodes == 3
    run_worker(settings, burst=True, redis=redis)
    return source


def _search_cache(settings: Settings, db: Database, *, refresh: bool = True) -> VectorCache:
    """The search cache file of the bundled model's vectors, as `podembed search` keeps it."""
    key = vector_spec(settings).key
    cache = VectorCache(cache_path(settings.data_dir, settings.mongo_uri, settings.mongo_db, key), key, timedelta(0))
    if refresh:
        cache.refresh(db.embeddings)
    return cache


def _stored(db: Database, **query: str) -> dict[str, np.ndarray]:
    return {d["chunk_id"]: from_bson_vector(d["embedding"]) for d in db.embeddings.find(query)}


def test_export_jsonl_and_parquet(settings: Settings, redis: Redis, db: Database, tmp_path: Path) -> None:
    _two_podcasts(settings, redis, db, tmp_path / "src")
    stored = _stored(db, podcast=SHOW)
    out = _run(settings, "export", "--podcast", SHOW)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == len(stored) and {r["podcast"] for r in rows} == {SHOW}
    assert [(r["episode_id"], r["seq"]) for r in rows] == sorted((r["episode_id"], r["seq"]) for r in rows)
    for row in rows:  # the float32 vectors read back exactly
        vector = np.array(row["embedding"], dtype=np.float32)
        assert vector.shape == (384,) and np.array_equal(vector, stored[row["chunk_id"]])
    assert out.stderr.strip() == (f"exported {len(stored)} vectors of 2 episodes of podcast {SHOW!r} "
                                  f"under {settings.model}")

    target = tmp_path / "e01.parquet"
    shown = _run(settings, "export", "--podcast", OTHER, "--episode", "E01", "--format", "parquet", "--out",
                 str(target), "--json")
    assert shown.returncode == 0, shown.stderr
    theirs = _stored(db, podcast=OTHER)
    assert json.loads(shown.stdout) == {"vectors": len(theirs), "episodes": 1, "format": "parquet",
                                        "out": str(target)}
    table = pq.read_table(target)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert set(table.column("podcast").to_pylist()) == {OTHER}
    for chunk_id, vector in zip(table.column("chunk_id").to_pylist(),
                                table.column("embedding").to_numpy(zero_copy_only=False), strict=True):
        assert np.array_equal(np.asarray(vector, dtype=np.float32), theirs[chunk_id])

    missing = _run(settings, "export", "--podcast", "No Such Show", "--out", str(tmp_path / "none.jsonl"))
    assert missing.returncode == 1
    assert missing.stderr == "podembed: no podcast 'No Such Show' among the stored vectors (none is close)\n"
    other = _run(settings, "export", "--podcast", SHOW, "--model", "another/model", "--out", str(tmp_path / "x.jsonl"))
    assert other.returncode == 1 and other.stderr == (f"podembed: no stored vectors of podcast {SHOW!r} under "
                                                      "another/model\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e01.parquet", "src"]  # no file, no leftover
    piped = _run(settings, "export", "--podcast", SHOW, "--format", "parquet")
    assert piped.returncode == 1 and "give --out FILE" in piped.stderr

    # A link planted at the name a temporary file used to have is not written through; the file is private.
    links = tmp_path / "links"
    links.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (links / ".show.jsonl.partial").symlink_to(victim)
    planted = _run(settings, "export", "--podcast", SHOW, "--out", str(links / "show.jsonl"))
    assert planted.returncode == 0, planted.stderr
    assert victim.read_text() == "keep me"
    written = links / "show.jsonl"
    assert not written.is_symlink() and written.stat().st_mode & 0o777 == 0o600
    assert len(written.read_text().splitlines()) == len(stored)
    assert sorted(p.name for p in links.iterdir()) == [".show.jsonl.partial", "show.jsonl"]


def test_delete_an_episode_then_nightly_embeds_it_again(settings: Settings, redis: Redis, db: Database,
                                                        tmp_path: Path) -> None:
    source = _two_podcasts(settings, redis, db, tmp_path)
    ours, theirs = _stored(db, podcast=SHOW, episode_id="E01"), _stored(db, podcast=OTHER)
    total, ledger = db.embeddings.count_documents({}), db.batches.count_documents({})
    (watermark,) = db.watermarks.find({})
    assert episode_key(SHOW, "E01") in [e[0] for e in watermark["episodes"]]

    # The local search cache, as a search leaves it: every stored vector, with its text.
    cache = _search_cache(settings, db)
    assert len(cache) == total and db.chunks.count_documents({}) == 0
    # The episode's texts queued again (a job not yet drained holds them in `chunks`).
    store = ChunkStore(db)
    store.write(store.load(sorted(ours), vector_spec(settings)))

    dry = _run(settings, "delete", "--podcast", SHOW, "--episode", "E01", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout) == {"podcast": SHOW, "episode_id": "E01", "vectors": len(ours), "chunks": len(ours),
                                      "cached_rows": len(ours), "episodes": ["E01"], "watermark_entries": 1,
                                      "dry_run": True}
    assert db.embeddings.count_documents({}) == total and db.watermarks.find_one({}) == watermark
    assert db.chunks.count_documents({}) == len(ours) and len(_search_cache(settings, db, refresh=False)) == total

    done = _run(settings, "delete", "--podcast", SHOW, "--episode", "E01")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"deleted {len(ours)} vectors and {len(ours)} chunk texts of episode 'E01' of "
                                  f"podcast {SHOW!r}, {len(ours)} search-cache rows; 1 watermark entry gone")
    assert db.embeddings.count_documents({}) == total - len(ours)
    assert _stored(db, podcast=SHOW, episode_id="E01") == {}
    # No text of the episode is left anywhere: not in `chunks`, not in the search cache.
    assert db.chunks.count_documents({}) == 0
    cached = _search_cache(settings, db, refresh=False)
    assert set(cached.ids) == {d["_id"] for d in db.embeddings.find({}, {"_id": 1})}
    assert len(cached) == total - len(ours) and not {i.partition("|")[0] for i in cached.ids} & ours.keys()
    assert _stored(db, podcast=OTHER).keys() == theirs.keys()  # the other show's E01 is untouched
    assert db.batches.count_documents({}) == ledger  # the ledger keeps its references

    again = nightly(settings, redis, db, source)
    assert (again.episodes, again.unchanged) == (1, 2)
    run_worker(settings, burst=True, redis=redis)
    assert _stored(db, podcast=SHOW, episode_id="E01").keys() == ours.keys()

    dry = _run(settings, "delete", "--podcast", SHOW, "--dry-run")
    assert dry.stdout.startswith(f"would delete {len(_stored(db, podcast=SHOW))} vectors and 0 chunk texts of 2 "
                                 f"episodes (E01, E05) of podcast {SHOW!r}, ")
    assert "; 2 watermark entries would go" in dry.stdout
    whole = _run(settings, "delete", "--podcast", SHOW, "--json")
    assert json.loads(whole.stdout)["episodes"] == ["E01", "E05"]
    assert db.embeddings.count_documents({"podcast": SHOW}) == 0 and db.embeddings.count_documents({}) == len(theirs)


def test_a_selection_that_matches_nothing_names_the_closest(settings: Settings, redis: Redis, db: Database,
                                                             tmp_path: Path) -> None:
    _two_podcasts(settings, redis, db, tmp_path / "src")
    total = db.embeddings.count_documents({})
    for command, message in [
        (("export", "--podcast", "The Seen and the Unsen"),
         f"no podcast 'The Seen and the Unsen' among the stored vectors (closest: {SHOW!r})"),
        (("export", "--podcast", SHOW.lower(), "--out", str(tmp_path / "x.jsonl")),
         f"no podcast {SHOW.lower()!r} among the stored vectors (closest: {SHOW!r})"),
        (("export", "--podcast", SHOW, "--episode", "E1"),
         f"no episode 'E1' of podcast {SHOW!r} among the stored vectors (closest: 'E01')"),
        (("delete", "--podcast", "Nope Show"), "no podcast 'Nope Show' among the stored vectors (none is close)"),
        (("delete", "--podcast", "cooking weekly", "--dry-run"),
         f"no podcast 'cooking weekly' among the stored vectors (closest: {OTHER!r})"),
        (("delete", "--podcast", SHOW, "--episode", "E133", "--dry-run"),
         f"no episode 'E133' of podcast {SHOW!r} among the stored vectors (none is close)"),
    ]:
        out = _run(settings, *command)
        assert (out.returncode, out.stdout, out.stderr) == (1, "", f"podembed: {message}\n"), command
    assert db.embeddings.count_documents({}) == total
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]

    named = _run(settings, "delete", "--podcast", SHOW, "--episode", "E05", "--dry-run")
    assert named.returncode == 0 and named.stdout.startswith(
        f"would delete {len(_stored(db, podcast=SHOW, episode_id='E05'))} vectors and "
        f"0 chunk texts of episode 'E05' of podcast {SHOW!r}")


def test_export_to_a_place_that_cannot_hold_a_file(settings: Settings, redis: Redis, db: Database,
                                                    tmp_path: Path) -> None:
    _two_podcasts(settings, redis, db, tmp_path)
    for out in ("/nonexistent/dir/x.jsonl", "/proc/x.jsonl"):
        shown = _run(settings, "export", "--podcast", SHOW, "--out", out)
        assert shown.returncode == 1 and shown.stdout == "", out
        assert shown.stderr == f"podembed: cannot write --out {out}: No such file or directory\n"


def test_delete_selects_episodes_without_a_podcast_and_names_in_either_normal_form(
        settings: Settings, redis: Redis, db: Database) -> None:
    nfc = "Café Olé"
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfd != nfc
    for args in ([str(DATA / "E03.txt")], [str(EXAMPLES / "E05.vtt"), "--podcast", nfd]):
        out = _run(settings, "ingest", *args, "--json")
        assert out.returncode == 0, out.stderr
    run_worker(settings, burst=True, redis=redis)
    assert {d["podcast"] for d in db.embeddings.find({})} == {None, nfc}
    accented = db.embeddings.count_documents({"podcast": nfc})
    # The show typed the other way is the same show: every chunk is already embedded.
    again = _run(settings, "ingest", str(EXAMPLES / "E05.vtt"), "--podcast", nfc, "--json")
    assert json.loads(again.stdout)["skipped"] == accented > 0

    no_podcast = {"podcast": {"$eq": None}}  # nx-27017 counts a bare None short
    loose = db.embeddings.count_documents(no_podcast)
    gone = _run(settings, "delete", "--no-podcast", "--json")
    assert gone.returncode == 0, gone.stderr
    # The texts went once the vectors were stored: nothing is left in `chunks` to delete.
    assert (json.loads(gone.stdout)["vectors"], json.loads(gone.stdout)["chunks"]) == (loose, 0)
    assert loose > 0 and db.embeddings.count_documents(no_podcast) == 0
    assert db.chunks.count_documents(no_podcast) == 0

    typed = _run(settings, "delete", "--podcast", nfc, "--json")
    assert json.loads(typed.stdout)["vectors"] == accented
    assert db.embeddings.count_documents({}) == 0 and db.chunks.count_documents({}) == 0
