"""Shared fixtures: one real redis-server per test session, flushed before each test that uses it."""

from __future__ import annotations

import pytest
import redis

from coordinator.ledger import Ledger
from coordinator.redis_server import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server) -> redis.Redis:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def ledger(redis_client) -> Ledger:
    return Ledger(redis_client)
