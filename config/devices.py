"""GPU names, as Modal's `gpu=` spells them and as torch reports them, matched by whole words.

Modal's GPU guide (https://modal.com/docs/guide/gpu.md) lists the type as `A10` and does not
tell the A10G from the A10: a container asked for "A10G" may report "NVIDIA A10" or
"NVIDIA A10G". Both are one GPU type here. Names match by whole words, so "A10" is not part
of "NVIDIA A100-SXM4-40GB" and "L4" is not part of "NVIDIA L40S", and "A100-80GB" matches
"NVIDIA A100-SXM4-80GB" and "NVIDIA A100 80GB PCIe" alike.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# Names that Modal bills and schedules as one GPU type.
SAME_GPU = {"a10g": "a10"}


def gpu_words(name: str) -> frozenset[str]:
    """The words of a GPU name, lower case, with aliases of one type spelled one way."""
    words = filter(None, re.split(r"[^a-z0-9]+", name.lower()))
    return frozenset(SAME_GPU.get(word, word) for word in words)


def is_gpu(gpu: str, device: str) -> bool:
    """Whether `device` (e.g. "NVIDIA A10", "cpu") is a GPU of type `gpu` (e.g. "A10G", "A100-80GB")."""
    wanted = gpu_words(gpu)
    return bool(wanted) and wanted <= gpu_words(device)


def best_match(names: Mapping[str, float], device: str) -> str | None:
    """The name of `names` that `device` is, the most specific one ("A100-80GB" before "A100"); None if none."""
    matching = [name for name in names if is_gpu(name, device)]
    return max(matching, key=lambda name: (len(gpu_words(name)), len(name)), default=None)
