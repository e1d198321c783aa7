"""The local worker: rq's SimpleWorker (no fork) in a process that loads the model once."""

from __future__ import annotations

import logging

from redis import Redis
from rq import SimpleWorker
from rq.serializers import JSONSerializer

from config.settings import Settings
from producer.connections import redis_client
from producer.enqueue import batch_queue, vector_spec
from worker.tasks import WorkerContext, init_context

logger = logging.getLogger(__name__)


def make_worker(settings: Settings, redis: Redis | None = None) -> tuple[SimpleWorker, WorkerContext]:
    """A SimpleWorker on the batch queue, with the model loaded before the first batch."""
    redis = redis or redis_client(settings)
    ctx = init_context(settings, redis)
    ctx.embedder(vector_spec(settings))
    worker = SimpleWorker([batch_queue(settings, redis)], connection=redis, serializer=JSONSerializer,
                          name=ctx.name)
    return worker, ctx


def run_worker(settings: Settings, *, burst: bool, redis: Redis | None = None) -> bool:
    """Drain the queue (until it is empty with `burst`); True if any batch was processed."""
    worker, _ = make_worker(settings, redis)
    # The scheduler moves retries whose back-off has passed back onto the queue.
    return worker.work(burst=burst, with_scheduler=True, logging_level=logging.getLevelName(logger.getEffectiveLevel()))
