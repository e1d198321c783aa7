"""Project-wide errors. They live in `config`, the package every other one imports."""

from __future__ import annotations


class PodembedError(Exception):
    """Base class of every error podembed raises on purpose."""


class ConfigError(PodembedError):
    """A setting is missing or malformed."""


class TranscriptFormatError(PodembedError):
    """A transcript file cannot be parsed; the message names the file and the line or field."""


class JobNotFoundError(PodembedError):
    """No job with this id exists in Redis or in MongoDB."""


class SelectionError(PodembedError):
    """A podcast or episode named to select by matches nothing; the message names the closest known ones."""


class EmbeddingError(PodembedError):
    """The model refused a batch or produced vectors that cannot be stored."""


class PayloadError(PodembedError):
    """A batch's payload is not one podembed wrote, or names what this worker does not serve."""


class StoreError(PodembedError):
    """MongoDB refused or could not be reached."""


class QueueError(PodembedError):
    """Redis refused or could not be reached."""


class EnqueueInterrupted(PodembedError):
    """A producer was stopped (Ctrl-C) before its job was wholly enqueued: the job is `interrupted`."""


class ForeignJobError(PodembedError):
    """A queued job names a function or callback that is not podembed's (someone else wrote it)."""


class ServiceError(PodembedError):
    """A local service could not be started or stopped."""


class DeviceError(PodembedError):
    """The device a worker was deployed for is not usable (a GPU container without a working GPU)."""


class DrainError(PodembedError):
    """A lane of the pipelined drain failed (not one batch's error): the drain stopped."""


class SearchError(PodembedError):
    """A search or search index request cannot be served (bad query, no vectors, no vector search)."""


class NotifyError(PodembedError):
    """A notify URL is refused (scheme, address), or a job's end could not be delivered to it."""
