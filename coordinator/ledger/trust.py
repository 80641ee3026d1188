"""Trust records: per volunteer, what its contributions came to (coordinator.schedule.standing reads them).

A volunteer is the token its work arrives with (coordinator.schedule.standing.volunteer_of): its own
credential, minted when it joined with the join code, or a worker token an admin made. Every outcome
is one atomic step (:data:`RECORD`): its count goes up and it joins the newest outcomes, of which
``KEPT`` are kept. Other ledger transitions record outcomes inside their own
transaction through :meth:`Trust.record_in` (an adapter rejected at fold time, a version
published), so a trust record never disagrees with the adapters it counts.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis

from coordinator.ledger import keys
from coordinator.ledger.codec import decode, trust_from_hash
from coordinator.ledger.records import TrustRecord

KEPT = 32  # outcomes kept per volunteer: the window coordinator.schedule.standing scores
MAX_DETAIL = 300

# KEYS: trust hash. ARGV: outcome, now, detail, how many to keep. Counts the outcome, keeps the newest.
RECORD = """
redis.call('HINCRBY', KEYS[1], 'n:' .. ARGV[1], 1)
local recent = cjson.decode(redis.call('HGET', KEYS[1], 'recent') or '[]')
table.insert(recent, {tonumber(ARGV[2]), ARGV[1], ARGV[3]})
while #recent > tonumber(ARGV[4]) do table.remove(recent, 1) end
redis.call('HSET', KEYS[1], 'recent', cjson.encode(recent))
"""


class Trust:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._record = client.register_script(RECORD)

    def record(self, volunteer: str, outcome: str, detail: str = "") -> None:
        """Count one outcome ("accepted", "agreed", or a Check value) for ``volunteer``."""
        if volunteer:
            self.record_in(self.r, volunteer, outcome, detail)

    def record_in(self, pipe: redis.client.Pipeline | redis.Redis, volunteer: str, outcome: str,
                  detail: str = "") -> None:
        """The same as :meth:`record`, queued on ``pipe`` (inside a caller's transaction)."""
        if volunteer:
            self._record(keys=[keys.trust(volunteer)], args=[outcome, time.time(), detail[:MAX_DETAIL], KEPT],
                         client=pipe)

    def folded_in_version(self, pipe: redis.client.Pipeline, volunteer: str, version: int) -> None:
        """Note, on ``pipe``, that one of ``volunteer``'s adapters is in ``version``."""
        if volunteer:
            pipe.zincrby(keys.trust_versions(volunteer), 1, str(version))

    def get(self, volunteer: str) -> TrustRecord | None:
        if not volunteer:
            return None
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(keys.trust(volunteer))
        pipe.zrange(keys.trust_versions(volunteer), 0, -1, withscores=True)
        data, versions = pipe.execute()
        if not data and not versions:
            return None
        return trust_from_hash(volunteer, decode(data), {v.decode(): n for v, n in versions})

    def many(self, volunteers: Iterable[str]) -> dict[str, TrustRecord]:
        """The records of ``volunteers`` that have one (one round trip; no versions read)."""
        names = [v for v in dict.fromkeys(volunteers) if v]
        pipe = self.r.pipeline(transaction=False)
        for v in names:
            pipe.hgetall(keys.trust(v))
        return {v: trust_from_hash(v, decode(d), {}) for v, d in zip(names, pipe.execute()) if d}

    def of_workers(self, worker_ids: Iterable[str]) -> dict[str, str]:
        """Worker id -> its volunteer: the token it registered with (its own id when none)."""
        ids = [w for w in dict.fromkeys(worker_ids) if w]
        pipe = self.r.pipeline(transaction=False)
        for w in ids:
            pipe.hget(keys.worker(w), "token")
        return {w: (t.decode() if t else w) for w, t in zip(ids, pipe.execute())}

    def clear(self, volunteer: str, probation: bool = False, banned: bool = False) -> None:
        """Forget a volunteer's outcomes (an operator's pardon); the versions it is in stay. With
        ``probation`` it starts over on probation (a volunteer the join code minted); a ban stays."""
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(keys.trust(volunteer))
        if probation:
            pipe.hset(keys.trust(volunteer), "probation", 1)
        if banned:
            pipe.hset(keys.trust(volunteer), "banned", 1)
        pipe.execute()

    def trim_versions(self, volunteer: str, keep: int) -> int:
        """Bound a volunteer's versions record to the newest ``keep`` versions it is in; the
        adapters of those dropped are added up in its retired record (its trust counts keep them
        too). How many versions were dropped."""
        key = keys.trust_versions(volunteer)
        with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    if pipe.zcard(key) <= keep:
                        return 0
                    entries = sorted(((int(v), n) for v, n in pipe.zrange(key, 0, -1, withscores=True)), reverse=True)
                    dropped = entries[keep:]
                    pipe.multi()
                    pipe.zrem(key, *(str(v) for v, _ in dropped))
                    pipe.hincrbyfloat(keys.volunteer_retired(volunteer), "older_versions_adapters",
                                      sum(n for _, n in dropped))
                    pipe.execute()
                    return len(dropped)
                except redis.WatchError:
                    continue

    def volunteers_with_versions(self) -> list[str]:
        """Every volunteer with a versions record (a scan: for the sweeper, never a hot path)."""
        prefix, suffix = keys.trust_versions("\0").split("\0")
        return [k.decode()[len(prefix):-len(suffix)] for k in self.r.scan_iter(match=keys.trust_versions("*"), count=1000)]

    def ban(self, volunteer: str) -> None:
        """Mark a volunteer banned: coordinator.schedule.standing excludes it for good."""
        self.r.hset(keys.trust(volunteer), "banned", 1)
