"""Clients for Redis and MongoDB, built from settings; nothing connects at import time."""

from __future__ import annotations

from pymongo import MongoClient
from pymongo.database import Database
from redis import Redis

from config.settings import Settings

# nx-27017 can stall for minutes under a large bulk write; a real server answers at once.
MONGO_TIMEOUT_MS = 120_000


def redis_client(settings: Settings) -> Redis:
    return Redis.from_url(settings.redis_url, socket_connect_timeout=10, health_check_interval=30)


def mongo_database(settings: Settings) -> Database:
    client: MongoClient = MongoClient(
        settings.mongo_uri,
        connectTimeoutMS=MONGO_TIMEOUT_MS,
        serverSelectionTimeoutMS=MONGO_TIMEOUT_MS,
        socketTimeoutMS=MONGO_TIMEOUT_MS,
        tz_aware=True,
    )
    return client[settings.mongo_db]
