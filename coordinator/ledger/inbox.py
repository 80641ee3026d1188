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
from dataclasses import dataclass, field

import redis

from coordinator.ledger import keys
from coordinator.ledger.leaders import FENCED, Fence, fence_pair, fenced

# KEYS: run record, inbox, the wake channel, the scheduler's leader lease. ARGV: worker id, units
# JSON, the inbox entry, record TTL (s), the units' lease-secret hashes (JSON), the scheduler's
# token (FENCED). 1 when placed; 0 when the run's record exists already: a retry of a placement
# that took effect places nothing a second time.
_PLACE = FENCED + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'worker', ARGV[1], 'units', ARGV[2], 'secrets', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('PUBLISH', KEYS[3], ARGV[1])
return 1
"""

# KEYS: run record, OUTBOUND_RESULTS. ARGV: now, the report (JSON). The report is marked and passed
# on in one step, once per run: 1, or 0 when it was passed on already (a retry finds it done).
_REPORT = """
if redis.call('HSETNX', KEYS[1], 'reported', ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
return 1
"""

RUN_RECORD_TTL_S = 7 * 24 * 3600  # a run record outlives any lease it carried


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    worker_id: str
    units: tuple[tuple[str, int], ...]  # (task id, fence), in the order they train
    secrets: dict[str, str] = field(default_factory=dict)  # task id -> sha256 of its lease secret


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
        self._place = client.register_script(_PLACE)
        self._report = client.register_script(_REPORT)

    # -- the scheduler's side ----------------------------------------------------------------

    def place(self, run_id: str, worker_id: str, units: list[tuple[str, int]], specs: list[str],
              secrets: dict[str, str] | None = None, leader: Fence | None = None) -> bool:
        """Put a run in ``worker_id``'s inbox, with its record (its units, and the sha256 of each
        unit's lease secret, which a report must show), in one step, and wake the frontends; only
        while ``leader`` (the scheduler's fence) leads when one is given (NotLeader otherwise).
        Placing the same run id again places nothing (False), so a retried call cannot put a run
        in twice."""
        return self.place_many([(run_id, worker_id, units, specs, secrets or {})], leader)[0]

    def place_many(self, runs: list[tuple[str, str, list[tuple[str, int]], list[str], dict[str, str]]],
                   leader: Fence | None = None) -> list[bool]:
        """:meth:`place` each (run id, worker id, units, specs, secret hashes), all in one round
        trip; each placement is its own fenced, idempotent step."""
        if not runs:
            return []
        lead_key, token = fence_pair("scheduler", leader)
        pipe = self.r.pipeline(transaction=False)
        for run_id, worker_id, units, specs, secrets in runs:
            entry = json.dumps({"run_id": run_id, "specs": specs})
            self._place(keys=[keys.outbound_run(run_id), keys.inbox(worker_id), keys.INBOX_WAKE, lead_key],
                        args=[worker_id, json.dumps(units), entry, RUN_RECORD_TTL_S, json.dumps(secrets), token],
                        client=pipe)
        return [bool(r) for r in fenced(pipe.execute)]

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
        return self._taken(raw)

    def seen_and_take(self, worker_id: str, now: float | None = None) -> tuple[str, list[str]] | None:
        """:meth:`seen`, then :meth:`take` without waiting, in one round trip (a poll's first look)."""
        now = now or time.time()
        pipe = self.r.pipeline(transaction=False)
        pipe.zadd(keys.OUTBOUND_POLLS, {worker_id: now})
        pipe.zadd(keys.WORKERS, {worker_id: now}, xx=True, gt=True)
        pipe.lpop(keys.inbox(worker_id))
        return self._taken(pipe.execute()[-1])

    def _taken(self, raw: bytes | None) -> tuple[str, list[str]] | None:
        if raw is None:
            return None
        run = json.loads(raw)
        self.r.hset(keys.outbound_run(run["run_id"]), "taken", time.time())
        return run["run_id"], list(run["specs"])

    def wakeups(self):
        """A subscription to the workers whose inbox was given a run (``get_message()['data']``: a
        worker id); it holds a connection of its own."""
        sub = self.r.pubsub(ignore_subscribe_messages=True)
        sub.subscribe(keys.INBOX_WAKE)
        return sub

    def run(self, run_id: str) -> RunRecord | None:
        data = self.r.hgetall(keys.outbound_run(run_id))
        if not data:
            return None
        units = tuple((t, int(f)) for t, f in json.loads(data[b"units"]))
        return RunRecord(run_id, _text(data[b"worker"]), units, json.loads(data.get(b"secrets") or "{}"))

    def report(self, report: RunReport) -> bool:
        """Pass a worker's report on to the scheduler, once per run; False if one was passed on already."""
        body = json.dumps({"run_id": report.run_id, "worker_id": report.worker_id,
                           "units": list(report.units), "handed_back": list(report.handed_back)})
        # One step: marked as reported only together with being passed on (a failure between the
        # two left a run reported that the scheduler never heard of, its worker busy for good).
        return bool(self._report(keys=[keys.outbound_run(report.run_id), keys.OUTBOUND_RESULTS],
                                 args=[time.time(), body]))
