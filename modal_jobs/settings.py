"""What the Modal app declares, as one typed object (`PODEMBED_MODAL_*` variables override the defaults).

The app is built from `ModalSettings.from_env()`, and the image carries the same values
(`to_env`) so a container sees the settings it was deployed with.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

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
)


@dataclass(frozen=True)
class ModalSettings:
    app_name: str = "podembed"
    # 24 GB holds instructor-xl in bf16 with large micro-batches; $1.10/h (PODEMBED_GPU_PRICE_PER_HOUR).
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
    # Seconds a drain takes new batches; the margin under `timeout` lets the last batch finish.
    drain_budget_s: int = 3000
    volume_name: str = "podembed-hf-cache"
    hf_cache_path: str = "/cache/huggingface"
    # Holds PODEMBED_REDIS_URL, PODEMBED_MONGO_URI and PODEMBED_API_TOKEN (and any other PODEMBED_*).
    secret_name: str = "podembed"
    # 03:00 UTC every night: nightly ingestion, then the launcher.
    nightly_cron: str = "0 3 * * *"
    python_version: str = "3.11"
    # PyPI's Linux wheel of torch is the CUDA build.
    torch_version: str = "2.13.0"
    # Status polls are I/O: one web container answers this many at once.
    web_max_inputs: int = 32

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ModalSettings:
        """Defaults, overridden by `PODEMBED_MODAL_*` variables (default: `os.environ`)."""
        return cls(**env_values(cls, PREFIX, environ))

    def __post_init__(self) -> None:
        for name in ("max_containers", "timeout", "drain_budget_s", "web_max_inputs"):
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

    def image_packages(self) -> list[str]:
        return [f"torch=={self.torch_version}", *PINNED_PACKAGES]


def container_task_id(environ: Mapping[str, str] | None = None) -> str:
    """The Modal container's id ("" outside Modal). A container restored from a memory
    snapshot gets its own id, while the snapshot holds the id of the one that made it."""
    environ = os.environ if environ is None else environ
    return environ.get("MODAL_TASK_ID", "")
