"""A container's device, model and bill: no silent CPU, one model, bf16 snapshots, prices by device,
containers lost before their exit, and the reconciliation with Modal's billing report.

Everything runs for real on this machine's CPU against real Redis and MongoDB; Modal's billing
report is the one recorded part (its items are built with modal's own dataclass).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import torch
from modal.billing import BillingReportItem
from modal.exception import PermissionDeniedError
from pymongo.database import Database
from redis import Redis

from config.errors import ConfigError, DeviceError
from config.settings import Settings
from modal_jobs.costs import billing_refused, measured_costs, reconcile
from modal_jobs.drain import Container
from modal_jobs.settings import process_started_at
from producer.enqueue import batch_queue, enqueue_episodes, ingest, parse_files, vector_spec
from producer.jobs import JobRecords
from tests.conftest import DATA, EXAMPLES, ROOT
from tests.soak.harness import wait_until
from tests.test_modal_drain import drain_container
from worker import embedder as embedder_module
from worker.embedder import get_embedder, nvidia_driver_version, weight_bytes


def _ingest(settings: Settings, redis: Redis, db: Database, path: Path):
    episodes, refused = parse_files([path], podcast="The Seen and the Unseen")
    assert refused == []
    return ingest(settings, redis, db, episodes, kind="ingest")


@pytest.mark.parametrize("device", [None, "cpu"])
def test_gpu_container_refuses_to_drain_on_cpu(
    settings: Settings, redis: Redis, db: Database, device: str | None
) -> None:
    job = _ingest(settings, redis, db, DATA / "E03.srt")
    container = Container(settings.replace(device=device), gpu="A10G")
    container.load_weights("ta-no-gpu")
    with pytest.raises(DeviceError) as refused:
        container.start("ta-no-gpu")
    message = str(refused.value)
    assert message.startswith(f"this container asked for a A10G GPU and refuses to drain on {device or 'cuda'}")
    # The reasons: the CUDA build of torch, the driver, and what torch says about CUDA.
    assert f"torch {torch.__version__} built for CUDA {torch.version.cuda}" in message
    assert "NVIDIA driver None" in message and "torch.cuda.is_available()=False" in message
    # Nothing was taken from the queue and no container was recorded.
    assert batch_queue(settings, redis).count == job.batches
    assert db.workers.count_documents({}) == 0


def test_gpu_memory_snapshot_puts_the_weights_on_the_gpu_before_the_snapshot(settings: Settings) -> None:
    # With a GPU memory snapshot the weights go to the GPU in the snapshot hook: without CUDA that hook refuses,
    # where a CPU memory snapshot loads on CPU and leaves the GPU to the restore.
    cpu_snapshot = Container(settings, gpu="A10", snapshot="cpu")
    cpu_snapshot.load_weights("ta-cpu-snapshot")
    assert cpu_snapshot.weights.key.device == "cpu"
    gpu_snapshot = Container(settings, gpu="A10", snapshot="gpu")
    with pytest.raises(DeviceError, match="this container asked for a A10 GPU and refuses to drain on cuda"):
        gpu_snapshot.load_weights("ta-gpu-snapshot")


def test_nvidia_driver_version_from_proc(tmp_path: Path) -> None:
    proprietary = tmp_path / "proprietary"
    proprietary.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
                           "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    open_module = tmp_path / "open"
    open_module.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  "
                           "(dvs-builder@U16-I3-B03-4-3)  Thu Jan 23 2025\n")
    assert nvidia_driver_version(proprietary) == "550.54.15"
    assert nvidia_driver_version(open_module) == "570.86.15"
    # Neither /proc nor nvidia-smi on this machine: no driver, said as None.
    assert nvidia_driver_version(tmp_path / "missing") is None


def test_gpu_weights_are_bf16_before_the_snapshot_cpu_weights_stay_fp32(settings: Settings) -> None:
    gpu = Container(settings, gpu="A10G")
    gpu.load_weights("ta-snap")
    cpu = Container(settings, gpu="cpu")
    cpu.load_weights("ta-cpu")
    assert (gpu.weights.key.device, gpu.weights.key.dtype) == ("cpu", "bfloat16")
    assert (cpu.weights.key.device, cpu.weights.key.dtype) == ("cpu", "float32")
    assert {p.dtype for p in gpu.weights.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in cpu.weights.model.parameters()} == {torch.float32}
    # Half the bytes to snapshot, restore and copy to the GPU (integer buffers keep their size).
    params = sum(p.numel() for p in cpu.weights.model.parameters())
    assert weight_bytes(cpu.weights) - weight_bytes(gpu.weights) == 2 * params
    assert weight_bytes(gpu.weights) < 0.51 * weight_bytes(cpu.weights)
    # Two cache entries: the fp32 model every CPU worker uses is not cast under it.
    default = get_embedder(settings.model_source(), revision=settings.model_revision,
                           pool_instruction=settings.pools_instruction(), device="cpu")
    assert default is cpu.weights
    # The bf16 weights still embed the same text to (nearly) the same vector.
    texts = [(DATA / "E03.txt").read_text()[:600]]
    a, _ = gpu.weights.encode(texts, [128], instruction=settings.instruction, normalize=True)
    b, _ = cpu.weights.encode(texts, [128], instruction=settings.instruction, normalize=True)
    assert float(np.dot(a[0], b[0])) > 0.99


def test_one_model_per_container(settings: Settings, redis: Redis, db: Database) -> None:
    # Real back-offs: a refused batch must fail at once, not wait out a retry.
    settings = settings.replace(retry_intervals=(60, 300), batch_max_chunks=8)
    served = _ingest(settings, redis, db, DATA / "E03.srt")
    episodes, _ = parse_files([EXAMPLES / "E05.vtt"])
    other = vector_spec(settings.replace(model="hkunlp/instructor-xl", model_path=None, model_revision="abc123"))
    foreign = enqueue_episodes(settings, redis, db, episodes, kind="backfill", spec=other)
    container = Container(settings, gpu="cpu")
    container.load_weights("ta-one-model")
    container.start("ta-one-model")
    loads = embedder_module.load_count()
    summary = container.drain(600)
    container.stop()

    assert embedder_module.load_count() == loads  # no second model was loaded inside the drain
    records = JobRecords(redis, db, settings.result_ttl)
    assert records.status(served.job_id).state == "finished"
    refused = records.status(foreign.job_id)
    assert (refused.state, refused.batches.failed, refused.chunks.failed) == ("failed", foreign.batches,
                                                                           foreign.chunks)
    assert all(reason.startswith("EmbeddingError: batch needs model 'hkunlp/instructor-xl' (revision abc123")
               and f"this worker serves {settings.model!r}" in reason for reason in refused.errors.values())
    assert (summary.failed, summary.retries_later) == (foreign.batches, 0)
    assert batch_queue(settings, redis).scheduled_job_registry.count == 0
    assert {e["model"] for e in db.batches.find({})} == {settings.model}

    # Settings read after a restore cannot swap the model the snapshot holds.
    restored = Container(settings, gpu="cpu")
    restored.load_weights("ta-snapshotter")
    with pytest.raises(ConfigError, match="snapshot holds .* but its settings now name hkunlp/instructor-xl"):
        restored.start("ta-restored", settings.replace(model="hkunlp/instructor-xl", model_path=None))


def test_prices_by_device() -> None:
    prices = Settings()
    assert prices.price_per_hour("NVIDIA A10G") == prices.price_per_hour("A10G") == 1.10
    assert prices.price_per_hour("NVIDIA L4") == 0.80
    assert prices.price_per_hour("NVIDIA A100-SXM4-40GB") == 2.10
    assert prices.price_per_hour("NVIDIA A100-SXM4-80GB") == 2.50
    assert prices.price_per_hour("NVIDIA H100 80GB HBM3") == 3.95
    assert prices.price_per_hour("cpu") == 0.047
    # Modal does not tell an A10G from an A10, and torch may report either: both are priced.
    assert prices.price_per_hour("NVIDIA A10") == prices.price_per_hour("A10") == 1.10
    # By whole words: the 80 GB A100 in its PCIe form, not the 40 GB rate; an L40S is not an L4.
    assert prices.price_per_hour("NVIDIA A100 80GB PCIe") == 2.50
    with pytest.raises(ConfigError, match="no price for device 'NVIDIA L40S'"):
        prices.price_per_hour("NVIDIA L40S")
    mine = Settings.from_env({"PODEMBED_GPU_PRICES": "A10G=0.99, RTX 4090=0"})
    assert (mine.price_per_hour("NVIDIA A10G"), mine.price_per_hour("NVIDIA L4")) == (0.99, 0.80)
    assert mine.price_per_hour("NVIDIA A10") == 0.99
    assert mine.price_per_hour("NVIDIA GeForce RTX 4090") == 0.0
    with pytest.raises(ConfigError, match=r"no price for device 'NVIDIA GeForce RTX 4090' in PODEMBED_GPU_PRICES"):
        prices.price_per_hour("NVIDIA GeForce RTX 4090")
    for bad in ("A10G", "A10G=cheap", "=1", "L4=-1"):
        with pytest.raises(ConfigError, match="PODEMBED_GPU_PRICES entry .* is not NAME=PRICE"):
            Settings(gpu_prices=bad)


DOOMED = """
import sys, time
from config.settings import Settings
from modal_jobs.drain import Container
from modal_jobs.settings import process_started_at

container = Container(Settings.from_env(), gpu="cpu", host_price_per_hour=0.047, started_at=process_started_at())
container.load_weights("ta-doomed")
container.start("ta-doomed")
print("ready", flush=True)
time.sleep(600)
"""


def test_container_killed_before_its_exit_is_billed_to_its_last_heartbeat(
    settings: Settings, redis: Redis, db: Database
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PODEMBED_REDIS_URL": settings.redis_url,
           "PODEMBED_MONGO_URI": settings.mongo_uri, "PODEMBED_MONGO_DB": settings.mongo_db,
           "PODEMBED_HEARTBEAT_INTERVAL": "1"}
    launched = datetime.now(UTC)
    process = subprocess.Popen([sys.executable, "-c", DOOMED], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        first = db.workers.find_one({"_id": "ta-doomed"})["updated_at"]
        wait_until(lambda: db.workers.find_one({"_id": "ta-doomed"})["updated_at"] > first + timedelta(seconds=1.5),
                   timeout=30, what="two heartbeats")
    finally:
        process.send_signal(signal.SIGKILL)  # preempted: @exit never runs
        process.wait(timeout=30)
    doc = db.workers.find_one({"_id": "ta-doomed"})
    # Billed from the process's boot (the kernel's clock, 1 s resolution), before any Python ran.
    assert abs((doc["started_at"] - launched).total_seconds()) < 1.5
    assert doc["exited_at"] is None
    assert doc["billed_seconds"] == pytest.approx((doc["updated_at"] - doc["started_at"]).total_seconds(), abs=0.002)

    beat = doc["updated_at"]
    [alive] = measured_costs(db, heartbeat_interval=1, now=beat + timedelta(seconds=2))
    [lost] = measured_costs(db, heartbeat_interval=1, now=beat + timedelta(seconds=4))
    assert (alive.lost, lost.lost) == (0, 1)
    assert lost.billed_seconds == doc["billed_seconds"]
    assert lost.billed_usd == pytest.approx(doc["billed_seconds"] * 0.047 / 3600)


def test_process_started_at_reads_the_kernel() -> None:
    before = datetime.now(UTC)
    child = subprocess.Popen(["sleep", "30"])
    try:
        started = process_started_at(str(child.pid))
        time.sleep(1.1)
        assert process_started_at(str(child.pid)) == started  # not the time of the call
    finally:
        child.kill()
        child.wait()
    assert abs((started - before).total_seconds()) < 1.5


def test_reconcile_with_the_billing_report(settings: Settings, redis: Redis, db: Database, tmp_path: Path) -> None:
    _ingest(settings, redis, db, DATA / "E03.srt")
    doc = drain_container(settings, db, "ta-bill")
    ours = doc["billed_seconds"] * doc["billed_price_per_hour"] / 3600
    asked = []

    def report(start: datetime, end: datetime) -> list[BillingReportItem]:
        asked.append((start, end))
        item = dict(object_id="fu-1", environment_name="main", interval_start=start, tags={})
        return [
            BillingReportItem(description="podembed", cost=Decimal("0.0031"),
                              cost_by_resource={"CPU": Decimal("0.0021"), "Memory": Decimal("0.0010")}, **item),
            BillingReportItem(description="another-app", cost=Decimal("5"), cost_by_resource={}, **item),
        ]

    check = reconcile(db, "podembed", report)
    [(start, end)] = asked
    assert start == doc["started_at"].replace(minute=0, second=0, microsecond=0) == check.start
    assert end == doc["updated_at"] == check.end
    assert (check.containers, check.modal_usd) == (1, pytest.approx(0.0031))
    assert check.modal_by_resource == {"CPU": pytest.approx(0.0021), "Memory": pytest.approx(0.0010)}
    assert check.our_billed_usd == pytest.approx(ours)
    assert check.difference_usd == pytest.approx(0.0031 - ours)

    # Without Modal credentials it says so, plainly, and fails.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "PODEMBED_REDIS_URL": settings.redis_url, "PODEMBED_MONGO_URI": settings.mongo_uri,
           "PODEMBED_MONGO_DB": settings.mongo_db}
    done = subprocess.run([sys.executable, "-m", "worker.cli", "costs", "--reconcile", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert "podembed: Modal refused the credentials (AuthError: " in done.stderr
    assert "`modal token new`, or MODAL_TOKEN_ID and MODAL_TOKEN_SECRET of the workspace" in done.stderr
    # A workspace whose plan has no billing report is told so, not sent after its credentials.
    plan = billing_refused(PermissionDeniedError("billing reports are not enabled for this workspace"))
    assert str(plan) == ("Modal refused this workspace's billing report (PermissionDeniedError: billing reports are "
                         "not enabled for this workspace): it needs a Team or Enterprise plan; on other plans compare "
                         "with the dashboard's usage page instead")
