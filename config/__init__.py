"""Settings, project-wide errors and the local embedded services."""

from config.errors import PodembedError
from config.settings import Settings

__all__ = ["PodembedError", "Settings"]
