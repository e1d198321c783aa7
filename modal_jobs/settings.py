"""What the Modal app declares, as one typed object (`PODEMBED_MODAL_*` variables override the defaults).

The app is built from `ModalSettings.from_env()`, and the image carries the same values
(`to_env`) so a container sees the settings it was deployed with.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

from config.errors import ConfigError
from config.settings import env_values

PREFIX = "PODEMBED_MODAL_"

# The versions the suite runs with, so vectors on Modal match vectors here.
PINNED_PACKAGES = (
    "sentence-transformers==6.2.0",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "huggingface_hub==2.4.0",
    "numpy==2.4.6",
    "rq==3.0.0",
    "redis==8.1.0",
    "pymongo==4.20.1",  # with dnspython: `mongodb+srv://` URIs resolve
    "fastapi==0.165.0",
    "prometheus-client==0.26.0",  # /metrics of the web endpoint
    "swagger-ui-bundle-v2==5.31.0",  # its /docs, offline
)


@dataclass(frozen=True)
class ModalSettings:
    app_name: str = "podembed"
    # 24 GB holds instructor-xl in bf16 with large micro-batches; $1.10/h (PODEMBED_GPU_PRICES).
    # "cpu": CPU containers (a test deploy); any other value is a GPU the container refuses to drain without.
    gpu: str = "A10G"
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
    torch_version: str = "2.13.0"
    # A CUDA 12 build of torch: it runs on any driver >= 525 (CUDA minor-version compatibility), while
    # PyPI's default Linux wheel may need a newer driver than Modal's hosts have (README, "Deploy").
    torch_index_url: str = "https://download.pytorch.org/whl/cu128"
    # Status polls are I/O: one web container answers this many at once.
    web_max_inputs: int = 32

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ModalSettings:
        """Defaults, overridden by `PODEMBED_MODAL_*` variables (default: `os.environ`)."""
        return cls(**env_values(cls, PREFIX, environ))

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

    def to_env(self) -> dict[str, str]:
        """The settings as variables, for the image: `from_env` in a container gives them back."""
        return {PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in fields(self)}

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
