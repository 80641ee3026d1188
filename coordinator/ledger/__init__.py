"""The ledger: all coordinator state, kept in Redis, one module per noun.

``Ledger(client)`` is the one handle callers keep; each noun hangs off it (``ledger.jobs``,
``ledger.tasks``, ``ledger.leases``, ``ledger.adapters``, ``ledger.versions``,
``ledger.workers``, ``ledger.tokens``, ``ledger.counters``, ``ledger.inbox``, ``ledger.trust``,
``ledger.replicas``) and returns the typed records of
:mod:`coordinator.ledger.records`. Every key is in :mod:`coordinator.ledger.keys`.

Guarantees (see DESIGN.md, "Ledger"):

* Every transition that touches several keys is atomic: a Lua script, or WATCH/MULTI.
* A task is leased with a fencing token from one strictly increasing counter; anything carrying
  an older fence is refused, and one Lua function decides that for every script (leases.py).
* An upload is accepted at most once per (task, fence, sha256) (adapters.py).
* A version is published, and its adapters leave the fold buffer, in one transaction (versions.py).
* One scheduler and one folder lead at a time, each under a lease with a fence; every write a
  leader makes checks its fence in the same atomic step (leaders.py).
* Scripts that a retried call would run twice answer the second run as the first (a request id,
  or a record that says the step was done): leases, twins, runs placed, reports passed on.
"""

from __future__ import annotations

import redis

from coordinator.ledger.adapters import Accepted, Adapters, adapter_id_for
from coordinator.ledger.counters import Counters, Refusal, Tally
from coordinator.ledger.inbox import Inboxes, RunRecord, RunReport
from coordinator.ledger.jobs import Jobs
from coordinator.ledger.leases import Leases, Renewal, is_twin, twin_id
from coordinator.ledger.records import (
    AdapterRecord,
    AdapterState,
    Check,
    FoldedAdapter,
    JobConfig,
    JobRecord,
    JobState,
    Lease,
    ReplicaGroup,
    TaskRecord,
    TaskState,
    TrustEvent,
    TrustRecord,
    VersionRecord,
    WorkerRecord,
)
from coordinator.ledger.replicas import Hold, Replicas, Settlement, replica_id
from coordinator.ledger.tasks import Tasks, count_states
from coordinator.ledger.tokens import ROLES, TokenEntry, Tokens, token_id
from coordinator.ledger.trust import Trust
from coordinator.ledger.versions import Versions
from coordinator.ledger.workers import TooManyWorkers, Workers


class Ledger:
    """Coordinator state in Redis. Thread-safe: every call is one or a few Redis round trips."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self.jobs = Jobs(client)
        self.tasks = Tasks(client)
        self.leases = Leases(client)
        self.adapters = Adapters(client)
        self.versions = Versions(client)
        self.workers = Workers(client)
        self.tokens = Tokens(client)
        self.counters = Counters(client)
        self.inbox = Inboxes(client)
        self.trust = Trust(client)
        self.replicas = Replicas(client)


__all__ = [
    "ROLES",
    "Accepted",
    "AdapterRecord",
    "AdapterState",
    "Adapters",
    "Check",
    "Counters",
    "Hold",
    "FoldedAdapter",
    "Renewal",
    "Inboxes",
    "JobConfig",
    "JobRecord",
    "JobState",
    "Jobs",
    "Lease",
    "Leases",
    "RunRecord",
    "RunReport",
    "Ledger",
    "Refusal",
    "ReplicaGroup",
    "Replicas",
    "Settlement",
    "Tally",
    "TaskRecord",
    "TaskState",
    "Tasks",
    "TokenEntry",
    "Tokens",
    "TooManyWorkers",
    "Trust",
    "TrustEvent",
    "TrustRecord",
    "VersionRecord",
    "Versions",
    "WorkerRecord",
    "Workers",
    "adapter_id_for",
    "count_states",
    "is_twin",
    "replica_id",
    "token_id",
    "twin_id",
]
