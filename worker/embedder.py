"""The model, loaded once per process and device, and the micro-batched encode loop.

INSTRUCTOR semantics: the instruction is prepended as a prompt and, for INSTRUCTOR
models, excluded from mean pooling (`include_prompt=False` on every Pooling
module), as the paper defines. sentence-transformers only does that by itself for
the hub names, so it is set here however the model is loaded.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling

from config.errors import ConfigError, EmbeddingError
from config.settings import PREFIX

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelKey:
    source: str
    revision: str | None
    device: str
    pool_instruction: bool
    dtype: str = "float32"  # "bfloat16" on CUDA, and on CPU for weights bound for a GPU


@dataclass(frozen=True)
class CudaReport:
    """Why CUDA is or is not usable here: what a GPU container records, or refuses to drain with."""

    available: bool
    torch_cuda: str | None  # the CUDA version torch was built with (None: a CPU build)
    driver: str | None  # the NVIDIA driver's version (None: no driver visible)
    device_count: int

    def line(self) -> str:
        return (f"torch {torch.__version__} built for CUDA {self.torch_cuda}, NVIDIA driver {self.driver}, "
                f"torch.cuda.is_available()={self.available}, {self.device_count} device(s)")


@dataclass
class EncodeStats:
    seconds: float = 0.0
    n_tokens: int = 0
    padded_tokens: int = 0
    forward_passes: int = 0


class OutOfMemory(Exception):
    """A forward pass did not fit (CUDA out-of-memory, or over the configured token cap)."""


class Embedder:
    """One loaded model and the micro-batch size that is known to fit on its device."""

    def __init__(self, model: SentenceTransformer, key: ModelKey, micro_batch_size: int, max_forward_tokens: int):
        self.model = model
        self.key = key
        self._configured: tuple[int, int] | None = None
        self.configure(micro_batch_size, max_forward_tokens)
        self.device_name = _device_name(key.device)
        self.dim = model.get_embedding_dimension()
        self._prompt_tokens: dict[str, int] = {}

    def configure(self, micro_batch_size: int, max_forward_tokens: int) -> None:
        """Set the configured limits; the micro-batch size learnt from out-of-memory survives a re-configure."""
        if (micro_batch_size, max_forward_tokens) != self._configured:
            self._configured = (micro_batch_size, max_forward_tokens)
            self.micro_batch_size = micro_batch_size
            self.max_forward_tokens = max_forward_tokens

    def prompt_tokens(self, instruction: str) -> int:
        """Tokens the instruction and the special tokens add to every text."""
        if instruction not in self._prompt_tokens:
            self._prompt_tokens[instruction] = len(self.model.tokenizer(instruction)["input_ids"])
        return self._prompt_tokens[instruction]

    def encode(
        self,
        texts: Sequence[str],
        lengths: Sequence[int],
        *,
        instruction: str,
        normalize: bool,
        on_vectors: Callable[[list[int], np.ndarray], None] | None = None,
    ) -> tuple[np.ndarray, EncodeStats]:
        """Vectors for `texts` (float32, in input order), with compute seconds and padding.

        `lengths` are the token counts (instruction and special tokens included), used to
        sort texts into micro-batches of similar length. `on_vectors(indices, vectors)` is
        called after every forward pass, so storage can overlap with the next pass.
        """
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        stats = EncodeStats()
        start = 0
        while start < len(order):
            size = min(self.micro_batch_size, len(order) - start)
            indices = order[start : start + size]
            try:
                vectors = self._forward([texts[i] for i in indices], [lengths[i] for i in indices],
                                        instruction, normalize, stats)
            except OutOfMemory:
                if size == 1:
                    raise EmbeddingError(
                        f"a single text of {lengths[indices[0]]} tokens does not fit on {self.device_name}"
                    ) from None
                self.micro_batch_size = max(1, size // 2)
                logger.warning("out of memory at micro-batch %d on %s: using %d from now on",
                               size, self.device_name, self.micro_batch_size)
                continue
            _check_finite(vectors, indices)
            out[indices] = vectors
            if on_vectors is not None:
                on_vectors(indices, vectors)
            start += size
        return out, stats

    def _forward(
        self, texts: list[str], lengths: list[int], instruction: str, normalize: bool, stats: EncodeStats
    ) -> np.ndarray:
        padded = max(lengths) * len(lengths)
        if self.max_forward_tokens and padded > self.max_forward_tokens:
            raise OutOfMemory
        began = time.perf_counter()
        try:
            vectors = self.model.encode(
                texts, prompt=instruction or None, batch_size=len(texts), convert_to_numpy=True,
                normalize_embeddings=normalize, show_progress_bar=False,
            )
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise OutOfMemory from None
        stats.seconds += time.perf_counter() - began
        stats.n_tokens += sum(lengths)
        stats.padded_tokens += padded
        stats.forward_passes += 1
        return vectors.astype(np.float32, copy=False)


def _check_finite(vectors: np.ndarray, indices: list[int]) -> None:
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise EmbeddingError(f"model produced non-finite vectors for {int(bad.sum())} of {len(indices)} texts")


_cache: dict[ModelKey, Embedder] = {}
_lock = threading.Lock()
_loads = 0


def load_count() -> int:
    """How many times this process has loaded a model (the worker should do it once)."""
    return _loads


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def cuda_report() -> CudaReport:
    """The CUDA state of this process. Initialises CUDA: call it after a snapshot's restore, never before."""
    available = torch.cuda.is_available()
    return CudaReport(available=available, torch_cuda=torch.version.cuda, driver=nvidia_driver_version(),
                      device_count=torch.cuda.device_count() if available else 0)


def nvidia_driver_version(proc_file: Path = Path("/proc/driver/nvidia/version")) -> str | None:
    """The kernel driver's version, read without CUDA: from /proc, else from `nvidia-smi`."""
    try:
        match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", proc_file.read_text())
        if match:
            return match.group(1)
    except OSError:
        pass
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None


def weight_bytes(embedder: Embedder) -> int:
    """Bytes of the model's parameters and buffers: what a memory snapshot and the copy to the GPU carry."""
    tensors = [*embedder.model.parameters(), *embedder.model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def get_embedder(
    source: str, *, revision: str | None, pool_instruction: bool, device: str | None = None,
    micro_batch_size: int = 32, max_forward_tokens: int = 0, dtype: str | None = None,
) -> Embedder:
    """The process-wide embedder for this model, device and dtype, loaded on first use.

    `dtype` defaults to bfloat16 on CUDA and float32 elsewhere. A GPU container loads "bfloat16" on
    CPU before its memory snapshot: half the bytes to snapshot, restore and copy to the GPU.
    """
    device = device or default_device()
    key = ModelKey(source=source, revision=revision, device=device, pool_instruction=pool_instruction,
                   dtype=dtype or _default_dtype(device))
    with _lock:
        embedder = _cache.get(key)
        if embedder is None:
            _check_device(device)
            embedder = _cache[key] = Embedder(_load(key), key, micro_batch_size, max_forward_tokens)
        embedder.configure(micro_batch_size, max_forward_tokens)
        return embedder


def move_embedder(embedder: Embedder, device: str) -> Embedder:
    """The same weights on `device` (bf16 on CUDA), cached under that device from now on.

    For memory snapshots: the model is loaded on CPU before the snapshot (no GPU exists
    then) and moved after the restore. A move is not a load: `load_count` is unchanged.
    """
    key = replace(embedder.key, device=device, dtype=_default_dtype(device))
    with _lock:
        if key not in _cache:
            began = time.perf_counter()
            model = embedder.model.to(device=device, dtype=getattr(torch, key.dtype))
            model.encode(["warm-up"], show_progress_bar=False)
            _cache.pop(embedder.key, None)
            _cache[key] = Embedder(model, key, embedder.micro_batch_size, embedder.max_forward_tokens)
            logger.info("moved model %s from %s to %s in %.1fs", key.source, embedder.key.device, device,
                        time.perf_counter() - began)
        return _cache[key]


def _load(key: ModelKey) -> SentenceTransformer:
    global _loads
    began = time.perf_counter()
    model_kwargs = {"dtype": getattr(torch, key.dtype)}
    try:
        model = SentenceTransformer(key.source, device=key.device, revision=key.revision, model_kwargs=model_kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load model {key.source!r}: {exc}") from exc
    model.eval()
    for module in model.modules():
        if isinstance(module, Pooling):
            module.include_prompt = key.pool_instruction
    model.encode(["warm-up"], show_progress_bar=False)
    _loads += 1
    logger.info("loaded model %s on %s in %.1fs (pool instruction: %s)",
                key.source, key.device, time.perf_counter() - began, key.pool_instruction)
    return model


def _check_device(device: str) -> None:
    """Refuse, naming the setting, a device this torch cannot use (`cuda` on a CPU build): torch's own
    errors (an AssertionError, a RuntimeError) would come from deep inside the model's load."""
    kind, _, index = device.partition(":")
    if kind == "cuda" and not (torch.cuda.is_available() and int(index or 0) < torch.cuda.device_count()):
        why = cuda_report().line()
    elif kind == "mps" and not torch.backends.mps.is_available():
        why = f"torch {torch.__version__} has no MPS here"
    else:
        return
    raise ConfigError(f"{PREFIX}DEVICE={device!r} is not usable here: {why}; unset it to use cuda where torch has "
                      "it, else cpu")


def _default_dtype(device: str) -> str:
    # T5 overflows to inf/NaN in fp16; bf16 keeps fp32's range on CUDA. CPU workers compute in fp32.
    return "bfloat16" if device.startswith("cuda") else "float32"


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return device
