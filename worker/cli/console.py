"""What the commands share: exit codes, and how they write to stdout and stderr."""

from __future__ import annotations

import json
import sys

from config.settings import redact_url
from producer.models import escape_controls

EXIT_ERROR = 1
EXIT_NOT_FOUND = 2
# What a shell reports for a command ended by SIGPIPE: the reader of its output went away.
EXIT_BROKEN_PIPE = 141
# What a shell reports for a command ended by Ctrl-C (SIGINT).
EXIT_INTERRUPTED = 130


def without_progress_bars() -> None:
    """No "Loading weights" bar from transformers (nor download bars) over a command's output or a worker's log."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def clock(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600:d}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def count(n: int, noun: str) -> str:
    """`1 batch`, `2 batches`: a count and its noun, singular or plural."""
    if n == 1:
        return f"{n} {noun}"
    if noun.endswith("y"):
        return f"{n} {noun[:-1]}ies"
    return f"{n} {noun}es" if noun.endswith(("ch", "s", "x")) else f"{n} {noun}s"


def print_json(doc: object) -> None:
    json.dump(doc, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def error(message: str) -> None:
    over_progress = "\r\x1b[K" if sys.stderr.isatty() else ""  # on a terminal, over a progress line
    print(f"{over_progress}podembed: {escape_controls(redact_url(message))}", file=sys.stderr)

