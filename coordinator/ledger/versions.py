"""Versions: the running model's lineage, 0 (the base model), 1, 2, ... each with its parent.

A version is published, and its adapters leave the fold buffer, in one transaction: an adapter
is never folded twice, and a coordinator that dies mid-fold folds the same buffer again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace

import redis

from coordinator.ledger import keys
from coordinator.ledger.leaders import Fence, NotLeader
from coordinator.ledger.connect import Durability
from coordinator.ledger.codec import decode, version_fields, version_from_hash
from coordinator.ledger.pages import Cursor, older
from coordinator.ledger.records import AdapterState, VersionRecord
from coordinator.ledger.trust import Trust
from nomoat.lineage import Lineage


class VersionConflict(ValueError):
    """A version that cannot be published under its number: another was published first."""


class Versions:
    def __init__(self, client: redis.Redis, durability: Durability = Durability()) -> None:
        self.r = client
        self.durability = durability
        self.trust = Trust(client)

    def latest(self) -> int | None:
        """The newest published version, None before version 0 exists."""
        value = self.r.get(keys.LATEST)
        return None if value is None else int(value)

    def get(self, number: int) -> VersionRecord | None:
        data = decode(self.r.hgetall(keys.version(number)))
        return version_from_hash(number, data) if data else None

    def all(self) -> list[VersionRecord]:
        """Every version, oldest first (grows with history: rebuilding, reports; hot paths page
        with :meth:`newest`)."""
        numbers = [int(v) for v in self.r.zrange(keys.VERSIONS, 0, -1)]
        pipe = self.r.pipeline(transaction=False)
        for n in numbers:
            pipe.hgetall(keys.version(n))
        return [version_from_hash(n, decode(d)) for n, d in zip(numbers, pipe.execute())]

    def newest(self, limit: int, after: Cursor | None = None) -> tuple[list[VersionRecord], Cursor | None]:
        """A page of the versions, newest first, and the cursor of the next (None: no more)."""
        entries, cursor = older(self.r, keys.VERSIONS, limit, after)
        numbers = [int(float(score)) for _, score in entries]
        pipe = self.r.pipeline(transaction=False)
        for n in numbers:
            pipe.hgetall(keys.version(n))
        rows = pipe.execute() if numbers else []
        return [version_from_hash(n, decode(d)) for n, d in zip(numbers, rows)], cursor

    def count(self) -> int:
        """How many versions are published (version 0 included)."""
        return int(self.r.zcard(keys.VERSIONS))

    def lineage(self) -> Lineage | None:
        """The model lineage fixed with version 0 (None for a ledger that has none yet)."""
        raw = self.r.get(keys.LINEAGE)
        return None if raw is None else Lineage.from_json(raw)

    def fix_lineage(self, lineage: Lineage) -> Lineage:
        """Record ``lineage`` unless one is recorded already (SET NX: the first writer wins, so
        coordinators sharing a ledger agree); returns the lineage that holds."""
        self.r.set(keys.LINEAGE, lineage.to_json(), nx=True)
        return self.lineage()

    def set_files(self, number: int, files: dict[str, str]) -> None:
        """Record a snapshot (a Hugging Face folder in the blob store) made for a version later."""
        self.r.hset(keys.version(number), "files", json.dumps(files))

    def publish(self, record: VersionRecord, folded: Sequence[tuple[str, float]] = (),
                norms: Sequence[float] = (), leader: Fence | None = None) -> VersionRecord:
        """Publish ``record`` and take its ``folded`` (adapter id, weight) out of the buffer,
        atomically; ``norms`` join the recent norms. Returns the record as stored.

        Refuses (ValueError) unless the record's number is exactly one past the newest version,
        so two coordinators racing to fold cannot both publish. With ``leader`` (the folder's
        fence) it also refuses (NotLeader) unless that fence still leads, checked in the same
        transaction (the lease is watched: a takeover before EXEC aborts it).
        """
        number = record.version
        record = replace(record, created=time.time())
        with self.r.pipeline(transaction=True) as pipe:
            pipe.watch(keys.LATEST, *([leader.key] if leader else []))
            if leader is not None:
                held = pipe.get(leader.key)
                if held is None or held.decode() != leader.token:
                    raise NotLeader(f"version {number} was not published: fence {leader.token} no longer "
                                    f"leads the folder (the lease holds {held.decode() if held else 'nobody'})")
            latest = pipe.get(keys.LATEST)
            expected = 0 if latest is None else int(latest) + 1
            if number != expected:
                raise VersionConflict(f"version {number} cannot be published: the next version is {expected}")
            jobs = [pipe.hget(keys.adapter(a), "job") for a, _ in folded]
            volunteers = [pipe.hget(keys.adapter(a), "volunteer") for a, _ in folded]
            pipe.multi()
            pipe.hset(keys.version(number), mapping=version_fields(record))
            if leader is not None:  # which term published it (tests/consistency.py checks the order)
                pipe.hset(keys.version(number), "leader_fence", leader.number)
            pipe.zadd(keys.VERSIONS, {str(number): number})
            pipe.set(keys.LATEST, number)
            for (adapter_id, weight), job in zip(folded, jobs):
                pipe.lrem(keys.FOLD_BUFFER, 0, adapter_id)
                pipe.hset(keys.adapter(adapter_id),
                          mapping={"state": AdapterState.FOLDED.value, "version": number, "weight": weight})
                if job:
                    pipe.hincrby(keys.job(job.decode()), "adapters_folded", 1)
                    pipe.hincrby(keys.COUNTERS, "adapters:folded", 1)  # every job's, for metrics to read alone
            for volunteer in volunteers:  # each folded adapter counts for its volunteer's trust
                if volunteer:
                    self.trust.record_in(pipe, volunteer.decode(), "accepted", f"folded into version {number}")
                    self.trust.folded_in_version(pipe, volunteer.decode(), number)
            for norm in norms:
                pipe.lpush(keys.RECENT_NORMS, norm)
            pipe.ltrim(keys.RECENT_NORMS, 0, 255)
            try:
                pipe.execute()
            except redis.WatchError:
                if leader is None:
                    raise
                raise NotLeader(f"version {number} was not published: the newest version or the folder's "
                                "lease changed while it was being written") from None
        # A replica holds it before it counts as published (NotDurable otherwise: the folder then
        # rebuilds from whatever the ledger holds, which a failover may have set back).
        self.durability.confirm(self.r, f"version {number}")
        return record
