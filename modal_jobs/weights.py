"""The model's weights in the Modal volume: downloaded once by a CPU function, read by every container.

A GPU container never downloads: with `HF_HUB_OFFLINE=1` it loads the pinned revision from the
volume's hub cache, and refuses to start, naming the command to run, when the volume lacks it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from config.errors import ConfigError
from config.settings import BUNDLED_MODEL, Settings

logger = logging.getLogger(__name__)

DOWNLOAD_COMMAND = "modal run -m modal_jobs.app::download_weights"


@dataclass(frozen=True)
class Weights:
    model: str
    revision: str | None
    path: str  # the directory the model loads from
    bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def weights_path(settings: Settings, hub_cache: str | Path) -> str:
    """Where a container loads the model from: the volume's snapshot of the pinned revision."""
    if settings.model_path or settings.model == BUNDLED_MODEL:
        return settings.model_source()  # an explicit directory, or the weights shipped in a package
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    revision = _pinned_revision(settings)
    try:
        return snapshot_download(settings.model, revision=revision, cache_dir=hub_cache, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, OSError) as exc:
        raise ConfigError(f"the weights of {settings.model} at revision {revision} are not in the volume "
                          f"({hub_cache}): run `{DOWNLOAD_COMMAND}` first ({type(exc).__name__})") from exc


def download_weights(settings: Settings, hub_cache: str | Path, commit: Callable[[], None]) -> Weights:
    """Download the pinned revision into the volume's hub cache, then `commit` the volume (so
    containers that start later see it at once, not when this one exits)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if settings.model_path or settings.model == BUNDLED_MODEL:
        path = settings.model_source()
    else:
        revision = _pinned_revision(settings)
        try:
            path = snapshot_download(settings.model, revision=revision, cache_dir=hub_cache)
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
            raise ConfigError(f"cannot download {settings.model} at revision {revision}: {exc}") from exc
    commit()
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    weights = Weights(model=settings.model, revision=settings.model_revision, path=path, bytes=size)
    logger.info("weights of %s at %s in %s: %d bytes, volume committed", weights.model, weights.revision, path, size)
    return weights


def _pinned_revision(settings: Settings) -> str:
    # A branch name would let the hub change the weights under vectors that share one key.
    if not settings.model_revision:
        raise ConfigError(f"PODEMBED_MODEL_REVISION must pin a commit of {settings.model} for Modal: it is part "
                          "of every vector's key, and containers load that revision from the volume only")
    return settings.model_revision
