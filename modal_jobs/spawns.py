"""Drains spawned on Modal that have not started yet, so repeated launches do not pile up calls.

A spawned drain is not a worker on the queue until its container has cold-started, which takes
minutes when GPUs are scarce. The launcher notes each spawn in a Redis sorted set (scored by the
spawn time) and the drain removes its note when it starts. A note older than the grace period
belongs to a call that never started (refused, or lost): it is dropped and no longer counted.
"""

from __future__ import annotations

import time
import uuid

from redis import Redis
from redis.exceptions import RedisError

from config.errors import QueueError


class SpawnLedger:
    def __init__(self, redis: Redis, queue_name: str) -> None:
        self.redis = redis
        self.key = f"podembed:{queue_name}:spawned-drains"

    def add(self, now: float | None = None) -> str:
        """A new spawn id, noted as cold until the drain that carries it starts."""
        spawn_id = uuid.uuid4().hex[:16]
        self._run(lambda: self.redis.zadd(self.key, {spawn_id: time.time() if now is None else now}))
        return spawn_id

    def started(self, spawn_id: str) -> None:
        self._run(lambda: self.redis.zrem(self.key, spawn_id))

    def cold(self, grace_s: float, now: float | None = None) -> int:
        """Drains spawned within `grace_s` and not started yet; older notes are dropped."""
        now = time.time() if now is None else now

        def count() -> int:
            with self.redis.pipeline() as pipe:
                pipe.zremrangebyscore(self.key, "-inf", f"({now - grace_s}")
                pipe.zcard(self.key)
                return int(pipe.execute()[1])

        return self._run(count)

    def _run(self, call):  # noqa: ANN001, ANN202 (a thunk and its result)
        try:
            return call()
        except RedisError as exc:
            raise QueueError(f"cannot read or write the spawned drains at {self.key!r}: {exc}") from exc
