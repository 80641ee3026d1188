"""Inboxes: runs placed on outbound-only workers, and their reports, as they cross the ledger.

An outbound worker cannot be reached; it asks. The scheduler (one process) puts a run in the
worker's inbox, a Redis list; whichever coordinator frontend holds that worker's long-poll takes
it with a blocking pop, so any number of frontends can serve long-polls and none keeps a run in
its memory. The worker's report goes the other way, into one results list the scheduler drains.
Each run also has a small record (its worker and its units with their fences) so a frontend can
check that a report names only the caller's own run and units. Liveness is a sorted set of when
each worker last asked for work.

What a run is (TaskSpec dicts) and what a report says (UnitResult dicts) is for the dispatcher
and the service to check; here they are JSON strings, stored as given.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis

from coordinator.ledger import keys

RUN_RECORD_TTL_S = 7 * 24 * 3600  # a run record outlives any lease it carried


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    worker_id: str
    units: tuple[tuple[str, int], ...]  # (task id, fence), in the order they train


@dataclass(frozen=True)
class RunReport:
    """What a worker said about one of its runs (JSON strings as the worker sent them)."""

    run_id: str
    worker_id: str
    units: tuple[str, ...]
    handed_back: tuple[str, ...]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Inboxes:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    # -- the scheduler's side ----------------------------------------------------------------

    def place(self, run_id: str, worker_id: str, units: list[tuple[str, int]], specs: list[str]) -> None:
        """Put a run in ``worker_id``'s inbox, with its record, in one transaction."""
        self.place_many([(run_id, worker_id, units, specs)])

    def place_many(self, runs: list[tuple[str, str, list[tuple[str, int]], list[str]]]) -> None:
        """:meth:`place` each (run id, worker id, units, specs), all in one transaction: a round's
        runs reach their inboxes in one round trip."""
        pipe = self.r.pipeline(transaction=True)
        for run_id, worker_id, units, specs in runs:
            key = keys.outbound_run(run_id)
            pipe.hset(key, mapping={"worker": worker_id, "units": json.dumps(units)})
            pipe.expire(key, RUN_RECORD_TTL_S)
            pipe.rpush(keys.inbox(worker_id), json.dumps({"run_id": run_id, "specs": specs}))
        if runs:
            pipe.execute()

    def withdraw(self, run_id: str, worker_id: str) -> bool:
        """Take a run back out of the inbox if no frontend has handed it out yet; True if it was."""
        for raw in self.r.lrange(keys.inbox(worker_id), 0, -1):
            if json.loads(raw)["run_id"] == run_id:
                return bool(self.r.lrem(keys.inbox(worker_id), 1, raw))
        return False

    def reported(self, run_id: str) -> bool:
        """Whether the worker has reported on the run (the report may not have been taken yet)."""
        return bool(self.r.hexists(keys.outbound_run(run_id), "reported"))

    def reports(self, most: int = 1000) -> list[RunReport]:
        """Take the reports that arrived since the last call, oldest first."""
        pipe = self.r.pipeline(transaction=True)
        pipe.lrange(keys.OUTBOUND_RESULTS, 0, most - 1)
        pipe.ltrim(keys.OUTBOUND_RESULTS, most, -1)
        raw, _ = pipe.execute()
        found = []
        for item in raw:
            d = json.loads(item)
            found.append(RunReport(d["run_id"], d["worker_id"], tuple(d["units"]), tuple(d["handed_back"])))
        return found

    def polling(self, since: float) -> dict[str, float]:
        """Worker id -> when it last asked for work, for those that asked since ``since``."""
        return {_text(w): s for w, s in self.r.zrangebyscore(keys.OUTBOUND_POLLS, since, "+inf", withscores=True)}

    def polling_count(self, since: float) -> int:
        """How many workers asked for work since ``since``."""
        return int(self.r.zcount(keys.OUTBOUND_POLLS, since, "+inf"))

    def forget_before(self, before: float) -> int:
        """Drop the liveness entries of workers that have not asked since ``before``."""
        return int(self.r.zremrangebyscore(keys.OUTBOUND_POLLS, "-inf", f"({before}"))

    # -- a frontend's side ---------------------------------------------------------------------

    def seen(self, worker_id: str, now: float | None = None) -> None:
        """The worker asked for work (or reported): it is alive and may be given runs, and it
        counts as seen (`nomoat status`) although it holds no lease to heartbeat."""
        now = now or time.time()
        pipe = self.r.pipeline(transaction=False)
        pipe.zadd(keys.OUTBOUND_POLLS, {worker_id: now})
        pipe.zadd(keys.WORKERS, {worker_id: now}, xx=True, gt=True)
        pipe.execute()

    def take(self, worker_id: str, wait_s: float) -> tuple[str, list[str]] | None:
        """The next run in ``worker_id``'s inbox, waiting up to ``wait_s`` for one: (run id, specs)."""
        if wait_s > 0:
            got = self.r.blpop([keys.inbox(worker_id)], timeout=max(1, round(wait_s)))
            raw = got[1] if got else None
        else:
            raw = self.r.lpop(keys.inbox(worker_id))
        if raw is None:
            return None
        run = json.loads(raw)
        self.r.hset(keys.outbound_run(run["run_id"]), "taken", time.time())
        return run["run_id"], list(run["specs"])

    def run(self, run_id: str) -> RunRecord | None:
        data = self.r.hgetall(keys.outbound_run(run_id))
        if not data:
            return None
        units = tuple((t, int(f)) for t, f in json.loads(data[b"units"]))
        return RunRecord(run_id, _text(data[b"worker"]), units)

    def report(self, report: RunReport) -> bool:
        """Pass a worker's report on to the scheduler, once per run; False if one was passed on already."""
        if not self.r.hsetnx(keys.outbound_run(report.run_id), "reported", time.time()):
            return False
        self.r.rpush(keys.OUTBOUND_RESULTS, json.dumps({
            "run_id": report.run_id, "worker_id": report.worker_id,
            "units": list(report.units), "handed_back": list(report.handed_back)}))
        return True
