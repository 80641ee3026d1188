"""Shared fixtures: one real redis-server per test session, flushed before each test that uses it.

And the line between the tiers: a test outside the slow tier (``-m "not slow"``, ``make
test-fast``) may not start nomoat's own commands (tests/procs.py) or a Ray cluster; it fails
saying so, so that the fast tier stays fast.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import redis

from coordinator.ledger import Ledger
from coordinator.redis_server import EmbeddedRedis
from tests import procs


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


class _NoProcesses:
    """tests/procs.py's ``subprocess`` outside the slow tier: starting a command is refused."""

    def __init__(self, test: str) -> None:
        self._test = test

    def _refuse(self, *args, **kwargs):
        raise RuntimeError(f"{self._test} starts a nomoat process but is not marked slow; "
                           "mark it @pytest.mark.slow (see pyproject.toml's markers)")

    Popen = run = _refuse

    def __getattr__(self, name: str):
        return getattr(subprocess, name)


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_processes(request, monkeypatch):
    if request.node.get_closest_marker("slow"):
        yield
        return
    monkeypatch.setattr(procs, "subprocess", _NoProcesses(request.node.nodeid))
    yield
    ray = sys.modules.get("ray")  # imported by whatever needed it; never imported here
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail(f"{request.node.nodeid} started a Ray cluster but is not marked slow; "
                    "mark it @pytest.mark.slow")
