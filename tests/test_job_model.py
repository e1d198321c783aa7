"""The job model: its states and their sets, its Redis keys by name, and the scripts' arguments by name."""

from __future__ import annotations

import pytest
from pymongo.database import Database
from redis import Redis

from config.settings import Settings
from producer import scripts
from producer.enqueue import ingest, parse_files
from producer.job_status import JobState
from producer.jobs import JobKeys, JobRecords
from tests.conftest import DATA
from worker.loop import run_worker


def test_states_spell_the_status_document_and_their_sets_are_defined_once() -> None:
    assert [s.value for s in JobState] == ["queued", "running", "finished", "partial", "failed", "cancelled",
                                          "interrupted"]
    assert JobState.ENDED == {"finished", "partial", "failed", "cancelled"}
    assert JobState.UNDONE == {"partial", "failed", "cancelled"}
    # Members compare and hash as their strings: documents read back from MongoDB match them.
    assert JobState.FINISHED in JobState.ENDED and JobState.INTERRUPTED not in JobState.ENDED
    assert f"{JobState.INTERRUPTED:<12}|" == "interrupted |"


def test_keys_are_named_and_the_scripts_name_the_same() -> None:
    keys = JobKeys.of("0123456789ab")
    assert keys.record == "podembed:job:0123456789ab"
    assert (keys.sizes, keys.producer, keys.totals) == ("podembed:job:0123456789ab:sizes",
                                                        "podembed:job:0123456789ab:producer", "podembed:totals")
    assert keys._fields[:len(scripts.JOB_KEYS)] == scripts.JOB_KEYS


def test_script_arguments_are_taken_by_name_in_the_declared_order() -> None:
    assert scripts.ordered(("batch_id", "now", "ttl"), {"ttl": 60, "batch_id": "b", "now": "t"}) == ["b", "t", 60]
    with pytest.raises(TypeError, match="takes batch_id, now, ttl; given batch_id, ttl"):
        scripts.ordered(("batch_id", "now", "ttl"), {"batch_id": "b", "ttl": 60})
    with pytest.raises(TypeError, match="given batch_id, now, ttl, when"):
        scripts.ordered(("batch_id", "now", "ttl"), {"batch_id": "b", "now": "t", "ttl": 60, "when": 1})
    assert scripts.STORED_SO_FAR.source.startswith("local done, progress = KEYS[1], KEYS[2]\n"
                                                   "local batch_id, stored, ttl = ARGV[1], ARGV[2], ARGV[3]\n")


def test_every_key_of_an_ended_job_expires(settings: Settings, redis: Redis, db: Database) -> None:
    episodes, _ = parse_files([DATA / "E03.txt"])
    job = ingest(settings, redis, db, episodes, kind="ingest")
    run_worker(settings, burst=True, redis=redis)
    records = JobRecords(redis, db, settings.result_ttl)
    assert records.status(job.job_id).state is JobState.FINISHED
    keys = JobKeys.of(job.job_id)
    ttls = {name: redis.ttl(getattr(keys, name)) for name in scripts.JOB_KEYS if redis.exists(getattr(keys, name))}
    # The batch sizes too: they outlived the job before.
    assert {"record", "done", "batches", "episodes", "sizes"} <= set(ttls)
    assert all(0 < ttl <= settings.result_ttl for ttl in ttls.values()), ttls
    assert (redis.exists(keys.producer), redis.ttl(keys.totals)) == (0, -1)  # the totals never expire
