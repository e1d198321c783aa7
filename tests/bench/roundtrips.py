"""Counting the round trips a process makes to Redis and MongoDB.

Redis: every request redis-py sends (one command, or one whole pipeline) is one round trip:
counted at `Connection.send_packed_command`, which every send goes through. MongoDB: pymongo's
command monitoring sees each command sent (a bulk write of many documents is one `update`).
Install before the clients are created (pymongo registers listeners per client at creation).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from pymongo import monitoring
from redis.connection import AbstractConnection


@dataclass
class RoundTrips:
    redis: int = 0
    mongo: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def total(self) -> int:
        return self.redis + self.mongo

    def reset(self) -> None:
        with self.lock:
            self.redis = self.mongo = 0


class _MongoCounter(monitoring.CommandListener):
    def __init__(self, counts: RoundTrips) -> None:
        self.counts = counts

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        with self.counts.lock:
            self.counts.mongo += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def install() -> RoundTrips:
    """Start counting in this process; returns the live counts."""
    counts = RoundTrips()
    send = AbstractConnection.send_packed_command

    def counted(self: AbstractConnection, command: object, check_health: bool = True) -> None:
        with counts.lock:
            counts.redis += 1
        send(self, command, check_health)

    AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
    monitoring.register(_MongoCounter(counts))
    return counts
