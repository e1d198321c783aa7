"""The bench's instruments: the delay proxy adds its round trip and passes bytes intact; the counter
counts one round trip per request (a Redis pipeline, a MongoDB bulk write)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from pymongo import InsertOne, MongoClient
from redis import Redis

from config.services import free_port
from config.settings import Settings
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "tests" / "bench"))
import roundtrips  # noqa: E402

RTT_MS = 200


@pytest.fixture
def proxied_redis(settings: Settings) -> Iterator[Redis]:
    port = free_port()
    target = settings.redis_url.rsplit(":", 1)[1].split("/")[0]
    proxy = subprocess.Popen([sys.executable, str(ROOT / "tests" / "bench" / "delay_proxy.py"), "--rtt-ms",
                              str(RTT_MS), f"{port}:127.0.0.1:{target}"], stdout=subprocess.PIPE, text=True)
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
        client = Redis.from_url(f"redis://127.0.0.1:{port}/0")
        yield client
        client.close()
    finally:
        proxy.terminate()
        proxy.wait()


def test_delay_proxy_adds_its_round_trip_and_keeps_bytes_intact(proxied_redis: Redis, redis: Redis) -> None:
    proxied_redis.ping()  # connect first: a new connection costs its own round trips
    began = time.perf_counter()
    proxied_redis.ping()
    assert time.perf_counter() - began >= RTT_MS / 1000  # the delay is a floor: load only adds to it
    value = os.urandom(3 * 1024 * 1024)  # many reads and writes on the way
    proxied_redis.set("big", value)
    assert redis.get("big") == value and proxied_redis.get("big") == value


def test_round_trips_are_counted_per_request(settings: Settings, redis: Redis) -> None:
    counts = roundtrips.install()
    client = Redis.from_url(settings.redis_url)
    mongo: MongoClient = MongoClient(settings.mongo_uri)
    try:
        client.ping()  # the connection's own handshake is not what is measured
        mongo.admin.command("ping")
        counts.reset()
        client.set("a", 1)
        client.get("a")
        with client.pipeline() as pipe:
            for i in range(10):
                pipe.incr(f"n{i}")
            pipe.execute()
        mongo[settings.mongo_db].things.bulk_write([InsertOne({"i": i}) for i in range(50)])
        assert (counts.redis, counts.mongo) == (3, 1)
    finally:
        mongo.drop_database(settings.mongo_db)
        mongo.close()
        client.close()
