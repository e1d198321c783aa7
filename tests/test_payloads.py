"""Batch payloads are checked before anything is written: a payload podembed did not write fails at
once with its reason, and no vector, ledger entry or count comes of it."""

from __future__ import annotations

import copy

import pytest
from pymongo.database import Database
from redis import Redis
from rq import Callback
from rq.job import Job
from rq.serializers import JSONSerializer

from config.settings import Settings
from producer.enqueue import ON_FAILURE, TASK, batch_queue, ingest, parse_files
from producer.jobs import JobRecords
from tests.conftest import EXAMPLES
from worker.loop import run_worker


def _queued_payload(settings: Settings, redis: Redis, db: Database) -> tuple[str, dict]:
    episodes, _ = parse_files([EXAMPLES / "E05.vtt"])
    job = ingest(settings.replace(batch_max_chunks=4), redis, db, episodes, kind="ingest")
    first = Job.fetch(JobRecords(redis, db, settings.result_ttl).batch_ids(job.job_id)[0], redis, JSONSerializer)
    return job.job_id, first.args[0]


def _tampered(payload: dict, change: str) -> dict:
    bad = copy.deepcopy(payload)
    if change == "operator-id":
        bad["chunk_ids"][0] = {"$gt": ""}
    elif change == "unknown-job":
        bad["job_id"], bad["batch_id"] = "0123456789ab", "0123456789ab-00000"
    elif change == "batch-not-of-job":
        bad["batch_id"] = bad["job_id"] + "-99999"
    elif change == "extra-field":
        bad["chunks"] = [{"text": "a" * 1000}]
    elif change == "model-path":
        bad["spec"]["model"] = "/etc"
        bad["spec"]["revision"] = 7
    elif change == "unstored-chunk":
        bad["chunk_ids"] = [bad["chunk_ids"][0].rsplit(":", 1)[0] + ":9999"]
    return bad


@pytest.mark.parametrize(("change", "reason"), [
    ("operator-id", "payload.chunk_ids: \"{'$gt': ''}\" is not a chunk id"),
    ("unknown-job", "job 0123456789ab has no such batch"),
    ("batch-not-of-job", "has no such batch"),
    ("extra-field", "payload: fields"),
    ("model-path", "payload.spec.revision: must be"),
    ("unstored-chunk", "chunk(s) of the batch are gone from"),
])
def test_forged_payload_fails_at_once_and_stores_nothing(
    settings: Settings, redis: Redis, db: Database, change: str, reason: str
) -> None:
    settings = settings.replace(retry_intervals=(3600,))  # a retried batch would wait an hour: it must not
    real_job, payload = _queued_payload(settings, redis, db)
    queue = batch_queue(settings, redis)
    forged = queue.enqueue(TASK, _tampered(payload, change), job_id="forged", at_front=True,
                           on_failure=Callback(ON_FAILURE), meta={"podembed_job": payload["job_id"], "n_chunks": 1})
    # Only the forged batch: nothing may be stored by it.
    for batch_id in queue.get_job_ids():
        if batch_id != "forged":
            queue.remove(batch_id)
    run_worker(settings, burst=True, redis=redis)

    forged = Job.fetch("forged", connection=redis, serializer=JSONSerializer)
    assert forged.is_failed and forged.retries_left in (0, None)
    assert reason in forged.latest_result().exc_string
    assert db.embeddings.count_documents({}) == 0 and db.batches.count_documents({}) == 0
    status = JobRecords(redis, db, settings.result_ttl).status(real_job)
    assert (status.chunks.embedded, status.chunks.failed, status.batches.failed) == (0, 0, 0)
