"""A GPU container's code run here on CPU: drains real jobs from Redis into MongoDB and accounts for them."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pymongo.database import Database
from redis import Redis

from config.errors import ConfigError, PodembedError
from config.settings import Settings
from modal_jobs.costs import cost_table, job_cost, measured_costs
from modal_jobs.drain import Container, utcnow
from modal_jobs.settings import ModalSettings
from producer.enqueue import EnqueuedJob, batch_queue, ingest, parse_files
from producer.jobs import JobRecords
from tests.conftest import DATA, EXAMPLES, ROOT
from worker import embedder as embedder_module
from worker.loop import drain, make_worker


def _ingest(settings: Settings, redis: Redis, db: Database, path: Path) -> EnqueuedJob:
    episodes, refused = parse_files([path], podcast="The Seen and the Unseen")
    assert refused == []
    return ingest(settings, redis, db, episodes, kind="ingest")


def drain_container(settings: Settings, db: Database, task_id: str) -> dict:
    """A CPU container's whole life, one drain of the queue; its `workers` document."""
    host = ModalSettings(gpu="cpu").host_price_per_hour(settings)
    container = Container(settings, gpu="cpu", host_price_per_hour=host)
    container.load_weights(task_id)
    container.start(task_id)
    container.drain(600)
    container.stop()
    return db.workers.find_one({"_id": task_id})


def test_container_drains_a_real_job_and_records_its_worker(settings: Settings, redis: Redis, db: Database) -> None:
    settings = settings.replace(batch_max_chunks=4)
    job = _ingest(settings, redis, db, DATA / "E03.srt")
    container = Container(settings, gpu="cpu", started_at=utcnow() - timedelta(seconds=2))
    container.load_weights("ta-local")
    container.start("ta-local")
    summary = container.drain(time_budget_s=600)
    container.stop()

    status = JobRecords(redis, db, settings.result_ttl).status(job.job_id)
    assert status.state == "finished"
    assert summary.worker == "ta-local"
    assert (summary.batches, summary.failed, summary.chunks, summary.embedded) == (job.batches, 0, job.chunks,
                                                                                  job.chunks)
    assert job.batches == 3
    ledger = list(db.batches.find({"job_id": job.job_id}))
    assert {e["worker"] for e in ledger} == {"ta-local"}
    assert summary.busy_seconds == pytest.approx(sum(e["gpu_seconds"] for e in ledger), rel=1e-9)
    assert summary.busy_seconds == pytest.approx(status.gpu_seconds, rel=1e-6)

    doc = db.workers.find_one({"_id": "ta-local"})
    assert (doc["worker"], doc["gpu"], doc["device"], doc["model"]) == ("ta-local", "cpu", "cpu", settings.model)
    # A CPU container computes in fp32: 4 bytes a weight.
    params = sum(p.numel() for p in container.weights.model.parameters())
    assert doc["weight_dtype"] == "float32" and doc["weight_bytes"] >= 4 * params
    assert doc["torch_cuda"] is None and doc["cuda_driver"] is None  # the CPU build of torch, no driver here
    assert (doc["drains"], doc["batches"], doc["failed"], doc["embedded"], doc["skipped"]) == (
        1, job.batches, 0, job.chunks, 0)
    assert doc["from_snapshot"] is False
    assert doc["load_seconds"] >= 0 and doc["to_device_seconds"] >= 0
    cold_start = (doc["ready_at"] - doc["started_at"]).total_seconds()
    assert doc["cold_start_seconds"] == pytest.approx(cold_start, abs=0.002)
    assert doc["cold_start_seconds"] >= 2
    assert doc["busy_seconds"] == pytest.approx(summary.busy_seconds)
    assert 0 < doc["busy_seconds"] < doc["billed_seconds"]
    # Billed runs from the start to the exit, idle included.
    assert doc["billed_seconds"] == pytest.approx((doc["exited_at"] - doc["started_at"]).total_seconds(), abs=0.002)
    assert doc["billed_seconds"] >= summary.billed_seconds >= doc["cold_start_seconds"]
    assert doc["price_per_hour"] == settings.price_per_hour("cpu") == 0.047
    # No host price given: a CPU container's life costs its reserved cores and memory only, none here.
    assert (doc["billed_price_per_hour"], doc["snapshot"]) == (0.0, "cpu")


def test_restored_container_starts_at_the_restore_without_a_second_load(
    settings: Settings, redis: Redis, db: Database
) -> None:
    container = Container(settings, gpu="cpu", started_at=utcnow() - timedelta(hours=1))
    container.load_weights("ta-snapshotter")
    loads = embedder_module.load_count()
    before = utcnow()
    record = container.start("ta-restored")
    assert record.from_snapshot is True
    assert record.load_seconds == 0.0
    assert before <= record.started_at <= record.ready_at
    # Counted from the restore, not from the process that made the snapshot an hour ago.
    assert record.cold_start_seconds < 60
    assert embedder_module.load_count() == loads
    container.stop()  # its heartbeat ends with it
    assert db.workers.find_one({"_id": "ta-restored"})["from_snapshot"] is True


def test_drain_budget_and_repeated_drains(settings: Settings, redis: Redis, db: Database) -> None:
    settings = settings.replace(batch_max_chunks=2)
    job = _ingest(settings, redis, db, EXAMPLES / "E05.vtt")
    worker, _ = make_worker(settings, redis)
    handler = signal.getsignal(signal.SIGINT)

    spent = drain(worker, time_budget_s=0)
    assert spent.batches == 0
    assert batch_queue(settings, redis).count == job.batches == 6
    rest = drain(worker)
    assert (rest.batches, rest.embedded, rest.failed) == (job.batches, job.chunks, 0)
    assert batch_queue(settings, redis).count == 0
    assert signal.getsignal(signal.SIGINT) is handler


@pytest.mark.filterwarnings("ignore:The .* function is executing locally")
def test_gpu_worker_class_drains_and_web_serves_locally(
    settings: Settings, redis: Redis, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {"PODEMBED_REDIS_URL": settings.redis_url, "PODEMBED_MONGO_URI": settings.mongo_uri,
                        "PODEMBED_MONGO_DB": settings.mongo_db, "PODEMBED_API_TOKEN": "t0ken"}.items():
        monkeypatch.setenv(name, value)
    job = _ingest(settings, redis, db, EXAMPLES / "E05.vtt")
    from modal_jobs import app as modal_app

    # A CPU deployment of the suite's model: with a GPU asked for, the container would refuse to drain here.
    deployment = ModalSettings(gpu="cpu", model=settings.model)
    monkeypatch.setattr(modal_app, "MODAL", deployment)
    # `.local()` runs both enter hooks (snap=True, then snap=False) before the method, as a container does,
    # but never the exit hook: the container is stopped here, so its record's heartbeat ends with the test.
    started: list[Container] = []
    start = Container.start

    def starting(container: Container, *args: object) -> object:
        started.append(container)
        return start(container, *args)

    monkeypatch.setattr(Container, "start", starting)
    try:
        summary = modal_app.GpuWorker().drain.local(120)
    finally:
        for container in started:
            container.stop()
    assert (summary["batches"], summary["chunks"], summary["failed"]) == (job.batches, job.chunks, 0)
    assert (summary["budget_s"], summary["retries_later"]) == (120, 0)
    doc = db.workers.find_one({"_id": summary["worker"]})
    assert (doc["gpu"], doc["embedded"], doc["from_snapshot"], doc["snapshot"]) == ("cpu", job.chunks, False, "cpu")
    assert doc["billed_price_per_hour"] == pytest.approx(deployment.host_price_per_hour(settings))

    # A secret that names another model than the deployment's: the container refuses, in one line.
    monkeypatch.setenv("PODEMBED_MODEL", "hkunlp/instructor-xl")
    with pytest.raises(ConfigError) as refused:
        modal_app.GpuWorker().drain.local(120)
    assert str(refused.value) == (
        f"the secret 'podembed' names PODEMBED_MODEL=hkunlp/instructor-xl (revision None) but this deployment serves "
        f"{settings.model} (revision None): deploy again from a shell with the secret's model and revision, or set "
        "the secret back")
    monkeypatch.delenv("PODEMBED_MODEL")

    client = TestClient(modal_app.web.local(), base_url="http://127.0.0.1")  # a host name the endpoint answers
    assert client.get(f"/jobs/{job.job_id}").status_code == 401
    polled = client.get(f"/jobs/{job.job_id}", headers={"Authorization": "Bearer t0ken"})
    assert polled.status_code == 200
    assert (polled.json()["state"], polled.json()["chunks"]["embedded"]) == ("finished", job.chunks)


@pytest.fixture
def root_logging() -> Iterator[None]:
    """The root logger as it was: a Modal entry point configures it, as in a container."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:], root.level = handlers, level


@pytest.mark.filterwarnings("ignore:The .* function is executing locally")
def test_preflight_function_runs_the_doctors_checks(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
    root_logging: None,
) -> None:
    for name, value in {"PODEMBED_REDIS_URL": settings.redis_url, "PODEMBED_MONGO_URI": settings.mongo_uri,
                        "PODEMBED_MONGO_DB": settings.mongo_db}.items():
        monkeypatch.setenv(name, value)
    from modal_jobs import app as modal_app

    monkeypatch.setattr(modal_app, "MODAL", ModalSettings(gpu="cpu", model=settings.model))
    lines = modal_app.preflight.local().splitlines()
    assert "ok    redis maxmemory-policy: noeviction" in lines
    assert f"ok    deployment model: {settings.model} (revision None), weights snapshotted in cpu memory" in lines
    # Each line is logged at INFO on stderr too, which is what `modal run` and `modal app logs` show.
    logged = capsys.readouterr().err
    assert "INFO modal_jobs.app: preflight ok    redis maxmemory-policy: noeviction" in logged
    redis.config_set("maxmemory-policy", "volatile-lru")
    try:
        with pytest.raises(PodembedError, match=r"^preflight: 1 check\(s\) failed: redis maxmemory-policy$"):
            modal_app.preflight.local()
    finally:
        redis.config_set("maxmemory-policy", "noeviction")


def test_costs_from_measured_containers(settings: Settings, redis: Redis, db: Database) -> None:
    first = _ingest(settings, redis, db, DATA / "E03.srt")
    second = _ingest(settings, redis, db, EXAMPLES / "E05.vtt")
    worker = drain_container(settings, db, "ta-costs")

    [row] = measured_costs(db)
    price = settings.price_per_hour("cpu")
    # Its life is billed for its reserved CPU cores and memory (Modal's rates), its batches at the CPU's price.
    host = 2.0 * 0.047 + 8192 / 1024 * 0.008
    assert worker["billed_price_per_hour"] == pytest.approx(host) == ModalSettings(gpu="cpu").host_price_per_hour(
        settings)
    assert (row.gpu, row.device, row.model, row.containers, row.from_snapshot, row.lost) == (
        "cpu", "cpu", settings.model, 1, 0, 0)
    assert row.embedded == first.chunks + second.chunks == worker["embedded"]
    assert (row.busy_seconds, row.billed_seconds) == (worker["busy_seconds"], worker["billed_seconds"])
    assert row.usd_per_million_billed == pytest.approx(worker["billed_seconds"] * host / 3600 / row.embedded * 1e6)
    assert row.usd_per_million_busy == pytest.approx(worker["busy_seconds"] * price / 3600 / row.embedded * 1e6)
    assert 0 < row.utilization < 1
    assert row.cold_start_median_s == worker["cold_start_seconds"]
    table = cost_table([row])
    assert f"| cpu (cpu) | {settings.model} | 1 (0) |" in table
    assert f"| ${row.usd_per_million_busy:.2f} | ${row.usd_per_million_billed:.2f} |" in table

    records = JobRecords(redis, db, settings.result_ttl)
    a = job_cost(db, first.job_id, records.batch_ids(first.job_id))
    b = job_cost(db, second.job_id, [])  # from the ledger by job id, once Redis has forgotten the job
    status = records.status(first.job_id)
    assert (a.batches, a.unaccounted_busy_seconds) == (first.batches, 0.0)
    assert a.busy_seconds == pytest.approx(status.gpu_seconds, rel=1e-6)
    assert a.busy_usd == pytest.approx(status.cost_usd, rel=1e-6)
    # The container's billed time is shared between the two jobs in proportion to their compute.
    assert a.billed_seconds + b.billed_seconds == pytest.approx(worker["billed_seconds"])
    assert a.billed_seconds / b.billed_seconds == pytest.approx(a.busy_seconds / b.busy_seconds)
    assert a.billed_usd == pytest.approx(a.billed_seconds * host / 3600)

    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PODEMBED_REDIS_URL": settings.redis_url,
           "PODEMBED_MONGO_URI": settings.mongo_uri, "PODEMBED_MONGO_DB": settings.mongo_db}
    shown = subprocess.run([sys.executable, "-m", "worker.cli", "costs", first.job_id, "--json"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["billed_seconds"] == pytest.approx(a.billed_seconds)
    table_out = subprocess.run([sys.executable, "-m", "worker.cli", "costs"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
    assert table_out.stdout.strip() == table
