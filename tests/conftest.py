"""Shared fixtures: one real redis-server per test session, flushed before each test that uses it.

And the line between the tiers: a test outside the slow tier (``-m "not slow"``, ``make
test-fast``) may not start nomoat's own commands (tests/procs.py) or a Ray cluster; it fails
saying so, so that the fast tier stays fast.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import redis
from hypothesis import settings

from coordinator.ledger import Ledger
from coordinator.ledger.redis_server import EmbeddedRedis
from tests import procs

# One intra-op thread per process (a value already set wins). The tiny model's matmuls are too
# small to gain from a second thread, and on a busy machine torch's OpenMP threads spin waiting for
# each other: ten training steps took 1.5 s with one thread and 3.7 s with two, on two shared
# cores. Set before any test module imports torch (nothing above does), so that it holds in
# every process the tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The inner loop's share of each property's examples: `make test-fast` passes
# --hypothesis-profile=fast; the whole suite (`make test`, CI) keeps hypothesis' default profile,
# and with it every property's full count (tests/test_fuzz.py's examples()).
settings.register_profile("fast", max_examples=20)


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


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """One real S3 server (SeaweedFS, tests/seaweed.py) per test session."""
    from tests.seaweed import SeaweedFS

    server = SeaweedFS(tmp_path_factory.mktemp("seaweed")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_store(seaweed, monkeypatch):
    """An empty S3Store on the session's SeaweedFS (a fresh prefix per test)."""
    import uuid

    from coordinator.model.store import open_store
    from tests.seaweed import use

    use(seaweed, monkeypatch)
    return open_store(f"s3://nomoat-test/{uuid.uuid4().hex[:12]}", data_dir=None)
