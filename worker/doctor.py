"""What a deploy depends on, checked one line at a time: Redis, MongoDB, the model, torch and the GPU.

Plain functions that return `Check`s: `podembed doctor` runs them here, and
`modal run -m modal_jobs.app::preflight` runs the same ones in a GPU container of the deployed
image, against the secret's services. A check that cannot apply (an Atlas index on a server
that is not Atlas) says "n/a" rather than failing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from pymongo.database import Database
from pymongo.errors import OperationFailure, PyMongoError
from redis import Redis
from redis.exceptions import RedisError

from config.errors import ConfigError, PodembedError
from config.settings import BUNDLED_MODEL, Settings, redact_url
from config.versions import drift, pinned

# The take script moves a batch with LMOVE, in Redis since 6.2.0 (https://redis.io/commands/lmove/).
MIN_REDIS = (6, 2)
# A line of a real transcript (examples/E01.vtt): what the model check embeds.
SAMPLE = ("Ram Singh is a farmer in a small village in India. One morning he woke up to a loud noise coming from "
          "over his head.")
PINGS = 5


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"
    NA = "n/a"


@dataclass(frozen=True)
class Check:
    """One thing a deploy depends on: `name`, its status, and what was found or what to do."""

    name: str
    status: Status
    detail: str

    def line(self) -> str:
        return f"{self.status.value:<4}  {self.name}: {self.detail}"

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status.value, "detail": self.detail}


def failed(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.status is Status.FAIL]


def run_checks(settings: Settings, *, want_gpu: bool = False,
               model: Callable[[Settings], list[Check]] | None = None) -> list[Check]:
    """Every check, in the order a first deploy meets them. `want_gpu`: a GPU container, where no CUDA is a
    failure; `model`: the model's checks (default `model_checks`, a Modal container finds the weights first)."""
    return [*package_checks(), *redis_checks(settings), *mongo_checks(settings), *(model or model_checks)(settings),
            *torch_checks(settings, want_gpu=want_gpu)]


def package_checks() -> list[Check]:
    off = drift(pinned())
    if off:
        return [Check("packages", Status.FAIL, f"not the versions of config/constraints.txt: {'; '.join(off)}")]
    return [Check("packages", Status.OK, "the versions of config/constraints.txt")]


def redis_checks(settings: Settings) -> list[Check]:
    from producer.connections import reach_redis

    try:
        redis = reach_redis(settings)
    except PodembedError as exc:
        return [Check("redis", Status.FAIL, str(exc))]
    try:
        server = redis.info("server")
        version = str(server.get("redis_version", "?"))
        parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        checks = [
            Check("redis", Status.OK, f"{redact_url(settings.redis_url)} answers"),
            Check("redis version", Status.OK if parts >= MIN_REDIS else Status.FAIL,
                  version if parts >= MIN_REDIS else f"{version}: the take script's LMOVE needs Redis "
                                                     f"{'.'.join(map(str, MIN_REDIS))} or later"),
            eviction_check(settings, redis),
            Check("redis round trip", Status.OK, f"{_round_trip_ms(redis.ping):.1f} ms (median of {PINGS} pings)"),
        ]
    except RedisError as exc:
        checks = [Check("redis", Status.FAIL, f"{redact_url(settings.redis_url)}: {exc}")]
    finally:
        redis.close()
    return checks


def eviction_check(settings: Settings, redis: Redis) -> Check:
    """Redis' `maxmemory-policy`: anything but noeviction loses work under memory pressure.

    From INFO (not CONFIG GET, which managed services often disable). `allkeys-*` policies evict
    queued batches and job records; `volatile-*` ones evict keys with a TTL, heartbeats and the
    producer's keys among them, so live work is taken for dead.
    """
    policy = str(redis.info("memory").get("maxmemory_policy", "unknown"))
    if policy == "noeviction":
        return Check("redis maxmemory-policy", Status.OK, policy)
    lost = ("queued batches and job records" if policy.startswith("allkeys") else
            "heartbeats and producer keys (live work taken for dead)")
    if settings.allow_eviction:
        return Check("redis maxmemory-policy", Status.WARN,
                     f"{policy}: under memory pressure Redis evicts {lost}; allowed by PODEMBED_ALLOW_EVICTION")
    return Check("redis maxmemory-policy", Status.FAIL,
                 f"{policy} at {redact_url(settings.redis_url)}: under memory pressure Redis evicts {lost}; set "
                 "maxmemory-policy noeviction (or PODEMBED_ALLOW_EVICTION=1 to run anyway)")


def refuse_eviction(settings: Settings, redis: Redis) -> None:
    """What a worker checks at start: `ConfigError` if Redis may evict the queue."""
    try:
        check = eviction_check(settings, redis)
    except RedisError:
        return  # Redis away: the worker's own first command says so
    if check.status is Status.FAIL:
        raise ConfigError(f"Redis maxmemory-policy {check.detail}")


def mongo_checks(settings: Settings) -> list[Check]:
    from producer.connections import reach_mongo

    try:
        db = reach_mongo(settings)
    except PodembedError as exc:
        return [Check("mongodb", Status.FAIL, str(exc))]
    try:
        return [Check("mongodb", Status.OK, f"{redact_url(settings.mongo_uri)} answers, database {db.name}"),
                Check("mongodb version", Status.OK, str(db.command("buildInfo").get("version", "?"))),
                _vector_check(db), _write_concern_check(db), _index_check(db), _search_index_check(settings, db)]
    except PyMongoError as exc:
        return [Check("mongodb", Status.FAIL, f"{redact_url(settings.mongo_uri)}: {redact_url(str(exc))}")]
    finally:
        db.client.close()


def _vector_check(db: Database) -> Check:
    from worker.store import from_bson_vector, to_bson_vector

    probe = np.array([0.25, -1.5, 3.0], dtype=np.float32)
    db.doctor.replace_one({"_id": "bson-vector"}, {"_id": "bson-vector", "v": to_bson_vector(probe)}, upsert=True)
    stored = db.doctor.find_one({"_id": "bson-vector"})
    db.doctor.delete_one({"_id": "bson-vector"})
    if stored is None or not np.array_equal(from_bson_vector(stored["v"]), probe):
        return Check("bson vectors", Status.FAIL, "a float32 BSON vector did not come back as written")
    return Check("bson vectors", Status.OK, "a float32 BSON vector is stored and read back")


def _write_concern_check(db: Database) -> Check:
    w = db.write_concern.document.get("w")
    if w == 0:
        return Check("mongodb write concern", Status.FAIL, "w=0: writes are not acknowledged, so a lost vector "
                                                           "goes unnoticed; remove w=0 from PODEMBED_MONGO_URI")
    return Check("mongodb write concern", Status.OK, f"w={w}" if w is not None else "the server's default")


def _index_check(db: Database) -> Check:
    if db.embeddings.estimated_document_count() == 0:
        return Check("embeddings indexes", Status.NA, "no vectors yet (the first worker creates the text_key index)")
    keys = {tuple(k for k, _ in info["key"]) for info in db.embeddings.index_information().values()}
    if ("text_key",) not in keys:
        return Check("embeddings indexes", Status.FAIL, "no text_key index: every dedupe lookup scans the "
                                                        "collection (a worker creates it at start)")
    return Check("embeddings indexes", Status.OK, "text_key")


def _search_index_check(settings: Settings, db: Database) -> Check:
    from worker.read.search import atlas_pipeline

    name = f"vector search index {settings.vector_index}"
    try:
        if any(i.get("queryable") is True for i in db.embeddings.list_search_indexes(settings.vector_index)):
            return Check(name, Status.OK, "queryable")
        # Some servers list no index rather than refuse: only one that runs `$vectorSearch` is Atlas.
        list(db.embeddings.aggregate(atlas_pipeline(settings.vector_index, np.ones(1, np.float32), 1, "", None, None)))
    except OperationFailure:
        return Check(name, Status.NA, "not Atlas: search runs the exact scan")
    return Check(name, Status.WARN, "not created or not queryable yet: `podembed index` creates it")


def model_checks(settings: Settings) -> list[Check]:
    """The weights at the pinned revision, the tokenizer, and one line embedded (its dimension)."""
    from producer.tokens import load_tokenizer
    from worker.embedder import get_embedder

    weights = _weights_check(settings)
    checks = [weights]
    try:
        tokenizer = load_tokenizer(settings)
        checks.append(Check("tokenizer", Status.OK, f"{tokenizer.count([SAMPLE])[0]} tokens in a sample line, "
                                                    f"max {tokenizer.max_seq_length} per text"))
        if weights.status is not Status.OK:
            return checks
        began = time.perf_counter()
        embedder = get_embedder(settings.model_source(), revision=settings.model_revision,
                                pool_instruction=settings.pools_instruction(), device=settings.device,
                                micro_batch_size=settings.micro_batch_size,
                                max_forward_tokens=settings.max_forward_tokens)
        vectors, _ = embedder.encode([SAMPLE], [len(SAMPLE.split())], instruction=settings.instruction,
                                     normalize=settings.normalize)
    except (PodembedError, OSError, ValueError, RuntimeError) as exc:
        return [*checks, Check("model", Status.FAIL, f"{type(exc).__name__}: {exc}")]
    finite = bool(np.isfinite(vectors).all())
    checks.append(Check("model dimension", Status.OK if finite else Status.FAIL,
                        f"{embedder.dim}-d on {embedder.device_name} ({embedder.key.dtype}), loaded and one line "
                        f"embedded in {time.perf_counter() - began:.1f} s"
                        + ("" if finite else ": the vector is not finite")))
    return checks


def _weights_check(settings: Settings) -> Check:
    """Where the model loads from. A hub model not in this machine's cache is a warning here (a local
    worker downloads it; Modal containers read it from the volume, which the preflight checks)."""
    from pathlib import Path

    name = "model weights"
    if settings.model_path or settings.model == BUNDLED_MODEL:
        source = settings.model_source()
        if not Path(source).is_dir():
            return Check(name, Status.FAIL, f"no model directory at {source}")
        return Check(name, Status.OK, f"{settings.model} in {source}")
    if not settings.model_revision:
        return Check(name, Status.WARN, f"PODEMBED_MODEL_REVISION does not pin a commit of {settings.model}: "
                                        "Modal refuses it (it is part of every vector's key)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        path = snapshot_download(settings.model, revision=settings.model_revision, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, OSError) as exc:
        return Check(name, Status.WARN, f"{settings.model} at revision {settings.model_revision} is not in this "
                                        f"machine's hub cache ({type(exc).__name__}): a local worker downloads it")
    return Check(name, Status.OK, f"{settings.model} at revision {settings.model_revision} in {path}")


def torch_checks(settings: Settings, *, want_gpu: bool) -> list[Check]:
    import torch

    from worker.embedder import cuda_report

    cuda = cuda_report()
    gpu_missing = Status.FAIL if want_gpu else Status.NA
    checks = [
        Check("torch", Status.OK, f"{torch.__version__}, " + (f"built for CUDA {cuda.torch_cuda}" if cuda.torch_cuda
                                                              else "a CPU build")),
        Check("nvidia driver", Status.OK if cuda.driver else gpu_missing, cuda.driver or "none on this machine"),
        Check("cuda", Status.OK if cuda.available else gpu_missing, cuda.line()),
    ]
    device = torch.cuda.get_device_name(0) if cuda.available else "cpu"
    try:
        checks.append(Check("device price", Status.OK, f"{device}: ${settings.price_per_hour(device):.3f}/h "
                                                       "(PODEMBED_GPU_PRICES)"))
    except ConfigError as exc:
        checks.append(Check("device price", Status.FAIL, str(exc)))
    return checks


def _round_trip_ms(ping: Callable[[], object]) -> float:
    times = []
    for _ in range(PINGS):
        began = time.perf_counter()
        ping()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)
