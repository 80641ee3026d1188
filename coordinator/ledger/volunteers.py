"""Volunteers minted by the join code: who joined, when, from where, and who is banned.

A volunteer's id is the id (sha256) of the credential it was minted (coordinator.ledger.tokens),
so everything keyed on a token's id (trust, the workers a token may have, who holds a lease) is
keyed on the volunteer. Minting counts against two windows, in Redis so that every gateway
agrees: volunteers minted from one source address, and overall (:data:`ADMIT`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from coordinator.ledger import keys
from coordinator.ledger.codec import decode

# KEYS: this source's counter, the overall counter. ARGV: most per source, most overall, window s.
# Returns 0 (counted), 1 (this source is at its most), 2 (everyone together is). Both are checked
# before either counts, so a refused join costs nothing.
ADMIT = """
local mine = tonumber(redis.call('GET', KEYS[1]) or '0')
if mine >= tonumber(ARGV[1]) then return 1 end
local all = tonumber(redis.call('GET', KEYS[2]) or '0')
if all >= tonumber(ARGV[2]) then return 2 end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]) * 2)
return 0
"""

SOURCE_FULL, ALL_FULL = 1, 2


@dataclass(frozen=True)
class VolunteerRecord:
    volunteer_id: str
    name: str
    joined: float
    source: str  # the address it joined from ("" for a worker token an admin made)
    banned: float  # when it was banned; 0: not banned


class Volunteers:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._admit = client.register_script(ADMIT)

    def admit(self, source: str, per_source: int, overall: int, window_s: int, now: float | None = None) -> int:
        """Count one join from ``source`` in the current window; 0, or SOURCE_FULL / ALL_FULL
        when that window is used up (nothing is counted then)."""
        window = int((now or time.time()) // window_s)
        return int(self._admit(keys=[keys.join_rate(source or "?", window), keys.join_rate("*", window)],
                               args=[per_source, overall, window_s]))

    def mint(self, volunteer_id: str, name: str, source: str) -> None:
        """Record a new volunteer, on probation (its trust record says so until it has earned trust)."""
        now = time.time()
        pipe = self.r.pipeline(transaction=True)
        pipe.zadd(keys.VOLUNTEERS, {volunteer_id: now})
        pipe.hset(keys.volunteer(volunteer_id), mapping={"name": name, "joined": now, "source": source})
        pipe.hset(keys.trust(volunteer_id), "probation", 1)
        pipe.execute()

    def get(self, volunteer_id: str) -> VolunteerRecord | None:
        data = decode(self.r.hgetall(keys.volunteer(volunteer_id)))
        return _record(volunteer_id, data) if data else None

    def all(self, most: int = 10_000) -> list[VolunteerRecord]:
        """The newest ``most`` volunteers minted, oldest first (an operator's listing)."""
        ids = [i.decode() for i in self.r.zrange(keys.VOLUNTEERS, -most, -1)]
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(keys.volunteer(i))
        return [_record(i, decode(d)) for i, d in zip(ids, pipe.execute()) if d]

    def workers_of(self, volunteer_ids: list[str]) -> dict[str, tuple[str, ...]]:
        """The ids of the workers each volunteer (a token's id) registered; one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for i in volunteer_ids:
            pipe.smembers(keys.token_workers(i))
        return {i: tuple(sorted(w.decode() for w in ws)) for i, ws in zip(volunteer_ids, pipe.execute())}

    def ban(self, volunteer_id: str) -> None:
        self.r.hset(keys.volunteer(volunteer_id), "banned", time.time())

    def drop_leases(self, task_ids: list[str], now: float | None = None) -> int:
        """Make these leases run out now: the scheduler's next round takes them back as it takes
        back any lease that ran out (its runs cancelled, the tasks issued again)."""
        if not task_ids:
            return 0
        now = now or time.time()
        pipe = self.r.pipeline(transaction=True)
        for task_id in task_ids:
            pipe.zadd(keys.LEASES, {task_id: now}, xx=True)
            pipe.hset(keys.task(task_id), "deadline", now)
        pipe.execute()
        return len(task_ids)

    def join_code(self) -> str:
        """The token id of the current join code ("" before the first is made)."""
        raw = self.r.get(keys.JOIN_CODE)
        return raw.decode() if raw else ""

    def set_join_code(self, token_id: str) -> None:
        self.r.set(keys.JOIN_CODE, token_id)


def _record(volunteer_id: str, data: dict[str, str]) -> VolunteerRecord:
    return VolunteerRecord(volunteer_id, data.get("name", ""), float(data.get("joined") or 0),
                           data.get("source", ""), float(data.get("banned") or 0))
