"""Clients for Redis and MongoDB, built from settings; nothing connects at import time.

A malformed URL is a `ConfigError` whose message shows the URL without its password.
"""

from __future__ import annotations

from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import PyMongoError
from redis import Redis

from config.errors import StoreError
from config.settings import Settings, bad_url, redact_url

# nx-27017 can stall for minutes under a large bulk write; a real server answers at once.
MONGO_SOCKET_TIMEOUT_MS = 120_000


def redis_client(settings: Settings) -> Redis:
    try:
        return Redis.from_url(settings.redis_url, socket_connect_timeout=10, health_check_interval=30)
    except ValueError as exc:
        raise bad_url("PODEMBED_REDIS_URL", settings.redis_url, exc) from None


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


def check_mongo(settings: Settings, db: Database) -> None:
    """One clear `StoreError` if MongoDB cannot be reached or refuses the URI's credentials."""
    where = redact_url(settings.mongo_uri)
    try:
        db.command("ping")
    except KeyError as exc:
        # pymongo's SCRAM handshake reading a reply with no 'payload': a server without
        # authentication (nx-27017) answering a URI that carries a user and password.
        raise StoreError(f"MongoDB at {where} does not take credentials (nx-27017 has no authentication): "
                         f"remove the user and password from PODEMBED_MONGO_URI ({exc!r} in the handshake)") from None
    except PyMongoError as exc:
        raise StoreError(f"MongoDB at {where}: {redact_url(str(exc), settings.mongo_uri)}") from None
