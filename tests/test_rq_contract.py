"""The rq internals `producer.batches` relies on, each checked by name: an rq upgrade that changes one fails
here first, before a drain misbehaves. They were read from rq 3.0.0, the pin of config/constraints.txt,
which pyproject and the Modal image both install.
"""

from __future__ import annotations

import ast
import inspect
import re
import tomllib
from collections.abc import Callable

import pytest
import rq
from redis import Redis
from rq import Queue, SimpleWorker
from rq.executions import Execution
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job
from rq.registry import StartedJobRegistry, clean_registries
from rq.scheduler import RQScheduler
from rq.scripts import RELEASE_LOCK_SCRIPT
from rq.worker import Worker
from rq.worker_registration import clean_worker_registry

from config.versions import pinned
from tests.conftest import ROOT

# Each internal the code calls, with the parameters it passes (in rq's order; `self` left out).
SIGNATURES: dict[str, tuple[Callable, list[str]]] = {
    "Job._handle_success": (Job._handle_success, ["result_ttl", "pipeline", "worker_name", "execution_id",
                                                  "execution_started_at", "execution_ended_at"]),
    "Worker._finalize_failure": (Worker._finalize_failure, ["job", "queue", "execution", "exc_info"]),
    "Execution.create": (Execution.create, ["job", "ttl", "pipeline", "worker_name"]),
    "Execution.heartbeat": (Execution.heartbeat, ["started_job_registry", "ttl", "pipeline"]),
    "Execution.delete": (Execution.delete, ["job", "pipeline"]),
    "IntermediateQueue.get_first_seen_key": (IntermediateQueue.get_first_seen_key, ["job_id"]),
    "IntermediateQueue.cleanup": (IntermediateQueue.cleanup, ["worker", "queue"]),
    "RQScheduler.__init__": (RQScheduler.__init__, ["queues", "connection", "interval", "logging_level",
                                                    "date_format", "log_format", "serializer", "name"]),
    "RQScheduler.acquire_locks": (RQScheduler.acquire_locks, ["auto_start"]),
    "RQScheduler.enqueue_scheduled_jobs": (RQScheduler.enqueue_scheduled_jobs, []),
    "RQScheduler.get_locking_key": (RQScheduler.get_locking_key, ["name"]),
    "Job.restore": (Job.restore, ["raw_data"]),
    "Job.prepare_for_execution": (Job.prepare_for_execution, ["worker_name", "pipeline"]),
    "Job.heartbeat": (Job.heartbeat, ["timestamp", "ttl", "pipeline", "xx"]),
    "Job.cleanup": (Job.cleanup, ["ttl", "pipeline", "remove_from_queue"]),
    "Job.get_result_ttl": (Job.get_result_ttl, ["default_ttl"]),
    "Worker.cleanup_execution": (Worker.cleanup_execution, ["job", "pipeline", "execution"]),
    "Worker.increment_successful_job_count": (Worker.increment_successful_job_count, ["pipeline"]),
    "Worker.increment_total_working_time": (Worker.increment_total_working_time, ["job_execution_time", "pipeline"]),
    "Worker.get_heartbeat_ttl": (Worker.get_heartbeat_ttl, ["job", "working_time"]),  # DrainWorker overrides it
    "Worker.perform_job": (Worker.perform_job, ["job", "queue", "execution"]),  # DrainWorker overrides it
    "Worker.maintain_heartbeats": (Worker.maintain_heartbeats, ["job", "execution"]),
    "Worker.heartbeat": (Worker.heartbeat, ["timeout", "pipeline"]),
    "Worker.set_state": (Worker.set_state, ["state", "pipeline"]),
    "Worker.all_keys": (Worker.all_keys, ["connection", "queue"]),
    "Queue.release_maintenance_lock": (Queue.release_maintenance_lock, []),
    "StartedJobRegistry.parse_job_id": (StartedJobRegistry.parse_job_id, ["entry"]),
    "clean_worker_registry": (clean_worker_registry, ["queue"]),
}


@pytest.mark.parametrize("name", SIGNATURES)
def test_signature(name: str) -> None:
    function, params = SIGNATURES[name]
    assert [p for p in inspect.signature(function).parameters if p != "self"] == params


def _job() -> Job:
    return Job("contract", connection=Redis(port=1))  # never connects: nothing here talks to Redis


# Attributes the code reads or sets on a job: set by rq's constructor.
@pytest.mark.parametrize("name", ["_result", "_failure_callback_name", "_success_callback_name",
                                  "_stopped_callback_name"])
def test_job_attribute(name: str) -> None:
    assert hasattr(_job(), name)


@pytest.mark.parametrize(("name", "owner"), [("registry_cleaning_key", Queue), ("acquired_locks", RQScheduler)])
def test_property(name: str, owner: type) -> None:
    assert isinstance(inspect.getattr_static(owner, name), property)


def test_worker_executions(redis: Redis) -> None:
    """The drain records each execution in the worker's own map, as `prepare_execution` does."""
    worker = SimpleWorker(["contract"], connection=redis)
    assert worker.executions == {}


def test_release_lock_script() -> None:
    """rq's script releasing a scheduler lock: KEYS[1] the lock's key, ARGV[1] the scheduler's name."""
    assert "'GET', KEYS[1]) == ARGV[1]" in RELEASE_LOCK_SCRIPT
    assert "KEYS[2]" not in RELEASE_LOCK_SCRIPT and "ARGV[2]" not in RELEASE_LOCK_SCRIPT


def test_key_layout() -> None:
    """The take script builds a batch's hash key from the prefix; the fleet view reads rq's worker set."""
    assert Job.redis_job_namespace_prefix == "rq:job:" and Job.key_for("b") == "rq:job:b"
    assert Worker.redis_workers_keys == "rq:workers" and Worker.redis_worker_namespace_prefix == "rq:worker:"


def test_clean_registries() -> None:
    """`clean_batch_registries` is rq's `clean_registries` with `StartedBatches`: the same registries, and the
    started registry's cleanup runs callbacks under its `death_penalty_class`."""
    cleaned = re.findall(r"(\w+Registry)\(", inspect.getsource(clean_registries))
    assert cleaned == ["FinishedJobRegistry", "StartedJobRegistry", "FailedJobRegistry", "DeferredJobRegistry",
                       "ReadyJobRegistry"]
    assert "self.death_penalty_class" in inspect.getsource(StartedJobRegistry.cleanup)


def test_pyproject_pins_the_rq_the_image_installs() -> None:
    """`pip install -e .[modal]` resolves the rq that `make install` and the Modal image install."""
    pin = pinned()["rq"]
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [d for d in dependencies if re.match(r"rq\b", d)] == [f"rq=={pin}"]
    assert rq.__version__ == pin


# The producer's enqueue builds rq's Queue, Retry and Callback for the batches it enqueues.
RQ_USERS = {"producer/enqueue.py"}


def test_only_producer_batches_imports_rq() -> None:
    """Every other module goes through `producer.batches`: an rq upgrade is checked in one place."""
    importers = []
    for path in sorted(p for top in ("config", "producer", "worker", "modal_jobs") for p in (ROOT / top).rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        if name.startswith("producer/batches/") or name in RQ_USERS:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            if any(m == "rq" or m.startswith("rq.") for m in modules):
                importers.append(name)
    assert importers == []
