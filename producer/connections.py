"""Clients for Redis and MongoDB, built from settings; nothing connects at import time.

A malformed URL is a `ConfigError` whose message shows the URL without its password.
"""

from __future__ import annotations

from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import PyMongoError
from redis import Redis

from config.errors import ConfigError
from config.settings import Settings, redact_url

# nx-27017 can stall for minutes under a large bulk write; a real server answers at once.
MONGO_SOCKET_TIMEOUT_MS = 120_000


def redis_client(settings: Settings) -> Redis:
    try:
        return Redis.from_url(settings.redis_url, socket_connect_timeout=10, health_check_interval=30)
    except ValueError as exc:
        raise ConfigError(f"PODEMBED_REDIS_URL={redact_url(settings.redis_url)!r}: {redact_url(str(exc))}") from None


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
        raise ConfigError(f"PODEMBED_MONGO_URI={redact_url(settings.mongo_uri)!r}: {redact_url(str(exc))}") from None
    return client[settings.mongo_db]
