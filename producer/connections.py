"""Clients for Redis and MongoDB, built from settings; nothing connects at import time.

A malformed URL is a `ConfigError` whose message shows the URL without its password.
`reach_redis` and `reach_mongo` make the first contact with a short timeout, so a server
that is down is one line in seconds; the clients keep their long timeouts for the work after.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

import pymongo
from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import PyMongoError
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import AuthenticationError, RedisError

from config.errors import QueueError, StoreError
from config.services import LOOPBACK
from config.settings import Settings, bad_url, redact_url

# nx-27017 can stall for minutes under a large bulk write; a real server answers at once.
MONGO_SOCKET_TIMEOUT_MS = 120_000


def redis_client(settings: Settings) -> Redis:
    try:
        # A new connection costs one round trip (the health check's PING), not five: no CLIENT SETINFO
        # LIB-NAME and LIB-VER (driver_info), and RESP2, so no HELLO and no CLIENT MAINT_NOTIFICATIONS.
        # A worker a WAN away from Redis pays this for each of its lanes. A `protocol` in the URL wins.
        return Redis.from_url(settings.redis_url, socket_connect_timeout=10, health_check_interval=30,
                              driver_info=None, protocol=2)
    except ValueError as exc:
        raise bad_url("PODEMBED_REDIS_URL", settings.redis_url, exc) from None


def open_connections(redis: Redis, count: int) -> None:
    """Open `count` connections of the client's pool now, checked by one PING each, all sent at once (one
    round trip in all): threads that take one later pay no connect and no first health check."""
    pool = redis.connection_pool
    taken = [pool.get_connection() for _ in range(count)]
    try:
        for connection in taken:
            connection.send_command("PING", check_health=False)
        for connection in taken:
            connection.read_response()
    finally:
        for connection in taken:
            pool.release(connection)


def run_script(client: Redis | Pipeline, source: str, keys: Sequence[str], args: Sequence[object]) -> object:
    """Run a Lua script in one round trip, as EVAL (Redis caches it by its hash).

    redis-py's `register_script` runs EVALSHA: a script this Redis has not seen yet costs three round
    trips (NOSCRIPT, SCRIPT LOAD, EVALSHA again), and in a pipeline a SCRIPT EXISTS before every execute.
    """
    return client.eval(source, len(keys), *keys, *args)


def mongo_database(settings: Settings) -> Database:
    try:
        client: MongoClient = MongoClient(
            settings.mongo_uri,
            # A server that is down fails a batch after this (RQ retries it); one that answers
            # slowly keeps the socket timeout.
            connectTimeoutMS=settings.mongo_timeout_ms,
            serverSelectionTimeoutMS=settings.mongo_timeout_ms,
            socketTimeoutMS=MONGO_SOCKET_TIMEOUT_MS,
            tz_aware=True,
        )
    except (PyMongoError, ValueError) as exc:
        raise bad_url("PODEMBED_MONGO_URI", settings.mongo_uri, exc) from None
    return client[settings.mongo_db]


def reach_redis(settings: Settings) -> Redis:
    """A Redis client that has answered a ping; `QueueError` in one line if none answers."""
    client = redis_client(settings)
    try:
        client.ping()
    except AuthenticationError as exc:
        client.close()
        raise QueueError(f"Redis at {redact_url(settings.redis_url)} refused the credentials "
                         f"({redact_url(str(exc), settings.redis_url)})") from None
    except RedisError as exc:
        client.close()
        raise QueueError(unreachable("Redis", settings.redis_url, str(exc))) from None
    return client


def reach_mongo(settings: Settings) -> Database:
    """A MongoDB database whose server answered within `first_contact_seconds`; `StoreError` in one line if not."""
    db = mongo_database(settings)
    try:
        check_mongo(settings, db)
    except StoreError:
        db.client.close()
        raise
    return db


def check_mongo(settings: Settings, db: Database) -> None:
    """One clear `StoreError` if MongoDB does not answer in time or refuses the URI's credentials."""
    try:
        # Caps server selection for this command only; later bulk writes keep the long timeouts.
        with pymongo.timeout(settings.first_contact_seconds):
            db.command("ping")
    except KeyError as exc:
        # pymongo's SCRAM handshake reading a reply with no 'payload': a server without
        # authentication (nx-27017) answering a URI that carries a user and password.
        raise StoreError(f"MongoDB at {redact_url(settings.mongo_uri)} does not take credentials (nx-27017 has no "
                         f"authentication): remove the user and password from PODEMBED_MONGO_URI ({exc!r} in the "
                         "handshake)") from None
    except PyMongoError:
        raise StoreError(unreachable("MongoDB", settings.mongo_uri,
                                     f"no answer within {settings.first_contact_seconds:g} s")) from None


def unreachable(name: str, url: str, reason: str) -> str:
    """One line for a service that does not answer; on this machine, how to start the local one."""
    try:
        local = urlsplit(url.split(",")[0]).hostname in LOOPBACK
    except ValueError:
        local = False
    hint = "is it running? podembed services up" if local else reason
    return f"{name} at {redact_url(url)} is not reachable ({hint})"
