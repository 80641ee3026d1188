"""The ledger: all coordinator state, kept in Redis, one module per noun.

``Ledger(client)`` is the one handle callers keep; each noun hangs off it (``ledger.jobs``,
``ledger.tasks``, ``ledger.leases``, ``ledger.adapters``, ``ledger.versions``,
``ledger.workers``, ``ledger.tokens``, ``ledger.counters``, ``ledger.inbox``, ``ledger.trust``,
``ledger.replicas``, ``ledger.volunteers``) and returns the typed records of
:mod:`coordinator.ledger.records`. Every key is in :mod:`coordinator.ledger.keys`.

Guarantees (see DESIGN.md, "Ledger"):

* Every transition that touches several keys is atomic: a Lua script, or WATCH/MULTI.
* A task is leased with a fencing token from one strictly increasing counter; anything carrying
  an older fence is refused, and one Lua function decides that for every script (leases.py).
  A lease is bound to the worker it was placed on and a secret only its run knows.
* An upload is accepted at most once per (task, fence, sha256) (adapters.py).
* A version is published, and its adapters leave the fold buffer, in one transaction (versions.py).
* One scheduler and one folder lead at a time, each under a lease with a fence; every write a
  leader makes checks its fence in the same atomic step (leaders.py).
* Scripts that a retried call would run twice answer the second run as the first (a request id,
  or a record that says the step was done): leases, twins, runs placed, reports passed on.
"""

from __future__ import annotations

import redis

from coordinator.ledger import keys

from coordinator.ledger.adapters import Accepted, Adapters, adapter_id_for
from coordinator.ledger.connect import Durability, NotDurable
from coordinator.ledger.counters import TOTALS_COUNTED, Counters, Refusal, Tally
from coordinator.ledger.inbox import Inboxes, RunRecord, RunReport
from coordinator.ledger.jobs import Jobs
from coordinator.ledger.leases import Claim, Leases, Renewal, is_twin, new_secret, no_such_lease, twin_id
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
from coordinator.ledger.operations import Operations
from coordinator.ledger.quotas import Quotas
from coordinator.ledger.replicas import Hold, Replicas, Settlement, replica_id
from coordinator.ledger.tasks import Tasks, count_states, new_task_id
from coordinator.ledger.tokens import ROLES, TokenEntry, Tokens, token_id
from coordinator.ledger.trust import Trust
from coordinator.ledger.versions import Versions
from coordinator.ledger.volunteers import VolunteerRecord, Volunteers
from coordinator.ledger.workers import TooManyWorkers, Workers


class Ledger:
    """Coordinator state in Redis. Thread-safe: every call is one or a few Redis round trips."""

    def __init__(self, client: redis.Redis, durability: Durability = Durability()) -> None:
        self.r = client
        self.durability = durability  # what a write that must survive a failover waits for
        self.jobs = Jobs(client)
        self.tasks = Tasks(client)
        self.leases = Leases(client)
        self.adapters = Adapters(client, durability)
        self.versions = Versions(client, durability)
        self.workers = Workers(client)
        self.tokens = Tokens(client)
        self.counters = Counters(client)
        self.inbox = Inboxes(client)
        self.trust = Trust(client)
        self.replicas = Replicas(client)
        self.volunteers = Volunteers(client)
        self.quotas = Quotas(client)
        self.operations = Operations(client)

    def index(self) -> None:
        """Once per start: the indexes and counters that reads on the hot path use instead of the
        history (the running jobs, each job's task counts, the ledger-wide totals), built for a
        ledger written before they existed. Reads every job, but only the first time."""
        self.jobs.index_running()
        if self.r.hget(keys.COUNTERS, TOTALS_COUNTED):
            return
        ids = self.jobs.ids()
        self.tasks.counts_of(ids)  # counts every job not yet counted (and adds it to the totals)
        jobs = [j for j in (self.jobs.get(i) for i in ids) if j is not None]
        totals = {f"jobs:{s.value}": sum(1 for j in jobs if j.state is s) for s in (JobState.DONE, JobState.FAILED)}
        totals["adapters:folded"] = sum(j.adapters_folded for j in jobs)
        totals["adapters:rejected"] = sum(j.adapters_rejected for j in jobs)
        self.r.hset(keys.COUNTERS, mapping={**totals, TOTALS_COUNTED: 1})


__all__ = [
    "ROLES",
    "Accepted",
    "AdapterRecord",
    "AdapterState",
    "Adapters",
    "Check",
    "Counters",
    "Durability",
    "NotDurable",
    "Hold",
    "FoldedAdapter",
    "Renewal",
    "Claim",
    "new_secret",
    "no_such_lease",
    "new_task_id",
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
    "VolunteerRecord",
    "Volunteers",
    "WorkerRecord",
    "Workers",
    "adapter_id_for",
    "count_states",
    "is_twin",
    "replica_id",
    "token_id",
    "twin_id",
]
