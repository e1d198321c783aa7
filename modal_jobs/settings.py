"""What the Modal app declares, as one typed object (`PODEMBED_MODAL_*` variables override the defaults).

The app is built from `ModalSettings.from_env()`, and the image carries the same values
(`to_env`) so a container sees the settings it was deployed with: the model included, which the
deploying shell's `PODEMBED_MODEL` and `PODEMBED_MODEL_REVISION` name.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

from config.errors import ConfigError
from config.settings import Settings, env_values

PREFIX = "PODEMBED_MODAL_"


@dataclass(frozen=True)
class ModalSettings:
    app_name: str = "podembed"
    # 24 GB holds instructor-xl in bf16 with large micro-batches; $1.10/h (PODEMBED_GPU_PRICES). Modal's GPU guide
    # (https://modal.com/docs/guide/gpu.md) names the type "A10" and does not tell an A10G from an A10.
    # "cpu": CPU containers (a test deploy); any other value is a GPU the container refuses to drain without.
    gpu: str = "A10"
    max_containers: int = 10
    # Batch work: nothing is kept warm between drains.
    min_containers: int = 0
    # Idle time is billed and a drain ends only when the queue is empty: stop soon after.
    scaledown_window: int = 60
    # Longest a drain call may run; the drain's own budget ends it earlier, between batches.
    timeout: int = 3600
    # A drain that dies leaves its batch to RQ (retried there); one Modal retry restarts the drain.
    retries: int = 1
    # Seconds a drain takes new batches; the margin under `timeout` lets the last batch finish
    # (clamped to `timeout` less PODEMBED_JOB_TIMEOUT and less the longest batch the ledger measured).
    drain_budget_s: int = 3000
    # The launcher runs this often: retries that fall due and abandoned batches wait at most this long.
    # Its plan spawns a drain for each period of the backlog's work (up to max_containers).
    launcher_period_s: int = 300
    # A spawned drain not started after this long never will (refused or lost): no longer counted as coming.
    cold_start_grace_s: int = 900
    volume_name: str = "podembed-hf-cache"
    hf_cache_path: str = "/cache/huggingface"
    # Holds PODEMBED_REDIS_URL, PODEMBED_MONGO_URI and PODEMBED_API_TOKEN (and any other PODEMBED_*).
    secret_name: str = "podembed"
    # 03:00 UTC every night: nightly ingestion, then the launcher.
    nightly_cron: str = "0 3 * * *"
    python_version: str = "3.11"
    # torch's version is config/constraints.txt's. Its CUDA build: torch 2.12 and 2.13 are built for CUDA 12.6 and
    # 13.0 only (pytorch/pytorch RELEASE.md, "Release Compatibility Matrix"; 2.11 had the last cu128 build). 12.6
    # has the widest margin: a CUDA 12 build runs on any driver >= 525 (minor-version compatibility), a CUDA 13
    # one needs >= 580, and 12.6 still carries kernels for Ampere 8.6 (the A10) (README, "The torch wheel").
    torch_index_url: str = "https://download.pytorch.org/whl/cu126"
    # Physical cores and MiB reserved per GPU container (https://modal.com/docs/guide/resources: billed at the
    # higher of the reservation and the use): the model's host side, the fetch and store lanes; instructor-xl's
    # bf16 weights (2.5 GB) and torch. Not measured on a GPU yet: `podembed costs --reconcile` shows the real bill.
    cpu: float = 2.0
    memory_mib: int = 8192
    # USD per GiB-hour of memory ($0.00000222 per GiB-second). modal.com/pricing is not in the stored pages;
    # this is its figure as quoted by finops.apis.io/finops/modal and beam.cloud's "Modal Pricing Explained" (2026),
    # which quote the CPU core-second ($0.0000131, PODEMBED_GPU_PRICES' cpu) alike.
    memory_price_per_gib_hour: float = 0.008
    # GPU memory snapshots put the weights on the GPU before the snapshot. Modal's docs call them alpha
    # (https://modal.com/docs/guide/memory-snapshots, "GPU Memory Snapshots (Alpha)"): off unless asked for.
    gpu_snapshot: bool = False
    # The model of this deployment: the deploying shell's PODEMBED_MODEL and PODEMBED_MODEL_REVISION (None: read
    # from there by `from_env`). Baked into the image, so a new model is a new deployment and a new snapshot.
    model: str | None = None
    model_revision: str | None = None
    # Status polls are I/O: one web container answers this many at once.
    web_max_inputs: int = 32

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ModalSettings:
        """Defaults, overridden by `PODEMBED_MODAL_*` variables (default: `os.environ`). The model is the
        image's `PODEMBED_MODAL_MODEL` in a container, and where that is unset (the deploying shell) the
        shell's `PODEMBED_MODEL` and `PODEMBED_MODEL_REVISION`."""
        values = env_values(cls, PREFIX, environ)
        if "model" not in values:
            shell = Settings.from_env(environ)
            values.update(model=shell.model, model_revision=shell.model_revision)
        return cls(**values)

    def __post_init__(self) -> None:
        for name in ("max_containers", "timeout", "drain_budget_s", "web_max_inputs", "launcher_period_s",
                     "cold_start_grace_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{PREFIX}{name.upper()} must be positive, got {getattr(self, name)}")
        if not 0 <= self.min_containers <= self.max_containers:
            raise ConfigError(f"{PREFIX}MIN_CONTAINERS must be between 0 and {PREFIX}MAX_CONTAINERS")
        if not 2 <= self.scaledown_window <= 3600:
            raise ConfigError(f"{PREFIX}SCALEDOWN_WINDOW must be between 2 and 3600 (Modal's bounds)")
        if self.drain_budget_s >= self.timeout:
            raise ConfigError(f"{PREFIX}DRAIN_BUDGET_S must be smaller than {PREFIX}TIMEOUT")
        if self.cpu <= 0 or self.memory_mib <= 0 or self.memory_price_per_gib_hour < 0:
            raise ConfigError(f"{PREFIX}CPU and {PREFIX}MEMORY_MIB must be positive and "
                              f"{PREFIX}MEMORY_PRICE_PER_GIB_HOUR not negative")
        if self.gpu_snapshot and self.wants_cpu:
            raise ConfigError(f"{PREFIX}GPU_SNAPSHOT needs a GPU: {PREFIX}GPU is cpu")

    def to_env(self) -> dict[str, str]:
        """The settings as variables, for the image: `from_env` in a container gives them back."""
        return {PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in fields(self)
                if getattr(self, f.name) is not None}

    def deployed(self, secret: Settings) -> Settings:
        """The settings of a container: the secret's, refused if it names another model than this deployment's
        (a snapshot holds the deployment's model; deploying again from a shell with the new one replaces it)."""
        if (secret.model, secret.model_revision) != (self.model, self.model_revision):
            raise ConfigError(f"the secret {self.secret_name!r} names PODEMBED_MODEL={secret.model} (revision "
                              f"{secret.model_revision}) but this deployment serves {self.model} (revision "
                              f"{self.model_revision}): deploy again from a shell with the secret's model and "
                              "revision, or set the secret back")
        return secret

    def host_price_per_hour(self, settings: Settings) -> float:
        """USD per hour of a container's reserved CPU cores and memory, billed on top of its GPU: a floor, as
        Modal bills the higher of the reservation and the use."""
        return self.cpu * settings.price_per_hour("cpu") + self.memory_mib / 1024 * self.memory_price_per_gib_hour

    @property
    def snapshot(self) -> str:
        """What the memory snapshot holds the weights in: "gpu" memory or "cpu" memory."""
        return "gpu" if self.gpu_snapshot else "cpu"

    @property
    def hub_cache(self) -> str:
        """The hub cache inside the volume (`HF_HOME/hub`)."""
        return f"{self.hf_cache_path}/hub"

    @property
    def modal_gpu(self) -> str | None:
        """The `gpu=` Modal is given: None for CPU containers."""
        return None if self.wants_cpu else self.gpu

    @property
    def wants_cpu(self) -> bool:
        return self.gpu.lower() == "cpu"


def log_to_stderr() -> None:
    """INFO lines of the project's loggers to stderr, which `modal app logs` and `modal run` show; Modal
    configures no handler for them, and the CLI's own setup never runs in a container."""
    root = logging.getLogger()
    if not any(getattr(h, "stream", None) is sys.stderr for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def drain_budget(modal: ModalSettings, requested: float, *, job_timeout: int, largest_batch_s: float = 0.0) -> float:
    """`requested`, clamped so the last batch a drain takes ends before Modal's `timeout` kills the call:
    the margin left is at least the job timeout (RQ ends a stuck batch first) and the longest batch measured."""
    margin = max(job_timeout, largest_batch_s)
    budget = min(requested, modal.timeout - margin)
    if budget <= 0:
        raise ConfigError(f"{PREFIX}TIMEOUT={modal.timeout} leaves no drain time: a drain keeps {margin:.0f} s "
                          f"for its last batch (PODEMBED_JOB_TIMEOUT={job_timeout}, longest batch "
                          f"{largest_batch_s:.0f} s); raise {PREFIX}TIMEOUT or lower PODEMBED_JOB_TIMEOUT")
    return budget


def process_started_at(pid: str = "self") -> datetime:
    """When this process started, from the kernel (a container is billed from its boot, not from our
    first line of Python); the time of the call where /proc cannot tell."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return datetime.now(UTC)
    return datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"), UTC)


def container_task_id(environ: Mapping[str, str] | None = None) -> str:
    """The Modal container's id ("" outside Modal). A container restored from a memory
    snapshot gets its own id, while the snapshot holds the id of the one that made it."""
    environ = os.environ if environ is None else environ
    return environ.get("MODAL_TASK_ID", "")
