"""Leases: a task is leased with a fence, kept alive by heartbeats, and given back or expired.

A fence comes from one strictly increasing counter. A lease that expires puts the task back in
the queue; the next lease gets a new fence, and anything carrying an older fence (a heartbeat, a
shard fetch, an upload) is refused. Whether (task, fence) holds the current lease is one Lua
function, :data:`CURRENT_LEASE`, that every script asking it uses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from coordinator.ledger import keys
from coordinator.ledger.records import Lease, TaskState
from coordinator.ledger.tasks import COUNT, EVENT

# lease_problem(key, task id, fence): "" when (task id, fence) holds the current lease of the task
# hash at ``key``, else a sentence saying why not. Every script that asks this uses this function.
CURRENT_LEASE = """
local function lease_problem(key, task_id, fence)
  local t = redis.call('HMGET', key, 'state', 'fence')
  if not t[1] then return "there is no task '" .. task_id .. "'" end
  if t[1] ~= 'leased' then return 'the task is ' .. t[1] .. ', not leased' end
  if t[2] ~= fence then
    return 'stale fence ' .. fence .. ': the lease was re-issued with fence ' .. tostring(t[2])
  end
  return ''
end
"""

# hold(key, fence, worker, token): who holds a lease. The first caller of a fence (its token hash,
# and its worker id once one is named) holds it; later calls under that fence must come from the
# same token and worker. An empty token checks nothing (admin, or the coordinator itself).
HOLD = """
local function hold(key, fence, worker, token)
  if token == '' then return '' end
  if redis.call('HGET', key, 'holder_fence') ~= fence then
    redis.call('HSET', key, 'holder_fence', fence, 'holder_token', token, 'holder_worker', worker)
    return ''
  end
  if redis.call('HGET', key, 'holder_token') ~= token then
    return 'the task is leased to another worker (another token holds its lease)'
  end
  local held = redis.call('HGET', key, 'holder_worker')
  if worker ~= '' and held == '' then redis.call('HSET', key, 'holder_worker', worker)
  elseif worker ~= '' and held ~= worker then return 'the task is leased to worker ' .. held .. ', not ' .. worker
  end
  return ''
end
"""

# KEYS: task, PENDING, LEASES, FENCE, COUNTERS. ARGV: task id, deadline, base version, now, max
# attempts. Returns the new fence, 0 when the task is not pending, -1 when it ran out of attempts.
# Counts the lease, and a re-issue when the task had a fence before (coordinator.ledger.counters).
_LEASE = COUNT + """
if redis.call('HGET', KEYS[1], 'state') ~= 'pending' then return 0 end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if attempts >= tonumber(ARGV[5]) then
  count(KEYS[1], 'failed')
  redis.call('HSET', KEYS[1], 'state', 'failed', 'finished', ARGV[4])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return -1
end
redis.call('HINCRBY', KEYS[5], 'leases', 1)
if tonumber(redis.call('HGET', KEYS[1], 'fence') or '0') > 0 then redis.call('HINCRBY', KEYS[5], 'reissues', 1) end
local fence = redis.call('INCR', KEYS[4])
count(KEYS[1], 'leased')
redis.call('HSET', KEYS[1], 'state', 'leased', 'fence', fence, 'deadline', ARGV[2],
           'leased_at', ARGV[4], 'attempts', attempts + 1)
if redis.call('HGET', KEYS[1], 'pinned') ~= '1' then redis.call('HSET', KEYS[1], 'base_version', ARGV[3]) end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return fence
"""

# One heartbeat, atomically: the lease check, the holder check, the new deadline, the worker seen,
# the event noted, and the version the run trains on (fixed by the first heartbeat of a lease:
# the newest version then, unless the task is pinned to one; later ones return the same).
# KEYS: task, LEASES, WORKERS, LATEST. ARGV: task id, fence, deadline, worker id, token hash, now,
# event ("" for none), events kept. Returns {"" or why not, base version or -1, 1 when this beat
# was the lease's first (its run started) else 0}.
_HEARTBEAT = CURRENT_LEASE + HOLD + EVENT + """
local problem = lease_problem(KEYS[1], ARGV[1], ARGV[2])
if problem == '' then problem = hold(KEYS[1], ARGV[2], ARGV[4], ARGV[5]) end
if problem ~= '' then return {problem, -1} end
redis.call('HSET', KEYS[1], 'deadline', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
if ARGV[4] ~= '' then redis.call('ZADD', KEYS[3], 'XX', ARGV[6], ARGV[4]) end
if ARGV[7] ~= '' then add_event(KEYS[1], ARGV[7], ARGV[6], ARGV[8]) end
local first = 0
if redis.call('HGET', KEYS[1], 'claimed') ~= ARGV[2] then
  redis.call('HSET', KEYS[1], 'claimed', ARGV[2])
  if redis.call('HGET', KEYS[1], 'pinned') ~= '1' then  -- a replica run keeps its task's version
    redis.call('HSET', KEYS[1], 'base_version', redis.call('GET', KEYS[4]) or '0')
  end
  first = 1
end
return {'', tonumber(redis.call('HGET', KEYS[1], 'base_version')), first}
"""

# KEYS: task. ARGV: task id, fence. "" when (task, fence) holds the current lease, else why not.
_CHECK = CURRENT_LEASE + "return lease_problem(KEYS[1], ARGV[1], ARGV[2])"

# KEYS: task. ARGV: task id, fence, worker id, token hash. "" when the caller holds the current
# lease (claiming it if no one does), else why not.
_HOLD_LEASE = CURRENT_LEASE + HOLD + """
local problem = lease_problem(KEYS[1], ARGV[1], ARGV[2])
if problem ~= '' then return problem end
return hold(KEYS[1], ARGV[2], ARGV[3], ARGV[4])
"""

# KEYS: LEASES, PENDING, COUNTERS. ARGV: now, task key prefix. Returns the ids whose lease expired
# (each counted as "leases_expired").
_EXPIRE = COUNT + """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for _, id in ipairs(ids) do
  local t = ARGV[2] .. id
  if redis.call('HGET', t, 'state') == 'leased' then
    redis.call('HINCRBY', KEYS[3], 'leases_expired', 1)
    count(t, 'pending')
    redis.call('HSET', t, 'state', 'pending', 'error', 'the lease expired')
    redis.call('ZADD', KEYS[2], ARGV[1], id)
  end
  redis.call('ZREM', KEYS[1], id)
end
return ids
"""

# KEYS: task, LEASES, PENDING. ARGV: task id, fence, error, now, max attempts. Returns the task's
# new state, "" when (task, fence) did not hold the lease.
_RELEASE = CURRENT_LEASE + COUNT + """
if lease_problem(KEYS[1], ARGV[1], ARGV[2]) ~= '' then return '' end
redis.call('ZREM', KEYS[2], ARGV[1])
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if attempts >= tonumber(ARGV[5]) then
  count(KEYS[1], 'failed')
  redis.call('HSET', KEYS[1], 'state', 'failed', 'error', ARGV[3], 'finished', ARGV[4])
  return 'failed'
end
count(KEYS[1], 'pending')
redis.call('HSET', KEYS[1], 'state', 'pending', 'error', ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
return 'pending'
"""

# A leased unit whose run was stopped for another unit's sake (the dispatcher cancels a run as a
# whole): back in the queue, the attempt its lease took given back, since it did not fail. A twin
# goes nowhere (its original still runs): it is retired. KEYS: task, LEASES, PENDING. ARGV: task
# id, fence, why, now. Returns the task's new state, "" when (task, fence) did not hold the lease.
_REQUEUE = CURRENT_LEASE + COUNT + """
if lease_problem(KEYS[1], ARGV[1], ARGV[2]) ~= '' then return '' end
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HGET', KEYS[1], 'twin_of') then
  count(KEYS[1], 'failed')
  redis.call('HSET', KEYS[1], 'state', 'failed', 'error', ARGV[3], 'finished', ARGV[4])
  return 'failed'
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '1')
count(KEYS[1], 'pending')
redis.call('HSET', KEYS[1], 'state', 'pending', 'error', ARGV[3], 'attempts', math.max(attempts - 1, 0))
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
return 'pending'
"""

# Speculation: a second lease on a leased task, held by a twin task "<id>.spec" with its own fence
# (so heartbeats, shard fetches and lease holders work unchanged). The twin is not one of the
# job's tasks; its attempts are spent, so if it fails or expires it is retired, never re-run.
# KEYS: task, twin, LEASES, FENCE, COUNTERS. ARGV: task id, twin id, deadline, now.
# Returns the twin's fence; 0 when the task is not leased or already has a live twin.
_SPECULATE = COUNT + """
if redis.call('HGET', KEYS[1], 'state') ~= 'leased' then return 0 end
if redis.call('HGET', KEYS[1], 'twin_of') then return 0 end
if redis.call('HGET', KEYS[2], 'state') == 'leased' or redis.call('HGET', KEYS[2], 'state') == 'done' then
  return 0
end
redis.call('HINCRBY', KEYS[5], 'speculations', 1)
local fence = redis.call('INCR', KEYS[4])
local t = redis.call('HMGET', KEYS[1], 'job', 'start', 'end', 'index', 'tokens')
count(KEYS[2], '')
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'task_id', ARGV[2], 'job', t[1], 'start', t[2], 'end', t[3], 'index', t[4],
           'tokens', t[5], 'twin_of', ARGV[1], 'fence', fence, 'deadline', ARGV[3],
           'leased_at', ARGV[4], 'attempts', 1000000, 'counted', 'twin')
count(KEYS[2], 'leased')
redis.call('HSET', KEYS[2], 'state', 'leased')
redis.call('HSET', KEYS[1], 'twin', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
return fence
"""

# A twin whose lease expired is retired. KEYS: twin, PENDING, LEASES. ARGV: twin id, why.
_RETIRE_TWIN = COUNT + """
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
count(KEYS[1], 'failed')
redis.call('HSET', KEYS[1], 'state', 'failed', 'error', ARGV[2])
"""

MAX_EVENTS = 32  # the newest events a task keeps


@dataclass(frozen=True)
class Renewal:
    """What a heartbeat found: the lease extended to ``deadline`` and the version the run trains
    on, or (``reason`` set) the lease is lost and nothing was changed."""

    reason: str
    deadline: float = 0.0
    base_version: int = -1
    started: bool = False  # this was the lease's first heartbeat: its run just started

    @property
    def ok(self) -> bool:
        return not self.reason


def twin_id(task_id: str) -> str:
    """The id of a task's speculative twin (see Leases.speculate)."""
    return f"{task_id}.spec"


def is_twin(task_id: str) -> bool:
    return task_id.endswith(".spec")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Leases:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._lease = client.register_script(_LEASE)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._check = client.register_script(_CHECK)
        self._hold = client.register_script(_HOLD_LEASE)
        self._expire = client.register_script(_EXPIRE)
        self._release = client.register_script(_RELEASE)
        self._requeue = client.register_script(_REQUEUE)
        self._speculate = client.register_script(_SPECULATE)
        self._retire_twin = client.register_script(_RETIRE_TWIN)

    def pending(self, limit: int = 100) -> list[str]:
        """The oldest pending task ids, first queued first."""
        return [t.decode() for t in self.r.zrange(keys.PENDING, 0, limit - 1)]

    def lease(self, task_id: str, deadline: float, base_version: int, max_attempts: int) -> int:
        """Lease a pending task; returns its new fence, 0 if not pending, -1 if it has failed."""
        return int(self._lease(keys=[keys.task(task_id), keys.PENDING, keys.LEASES, keys.FENCE, keys.COUNTERS],
                               args=[task_id, deadline, base_version, time.time(), max_attempts]))

    def lease_many(self, task_ids: list[str], deadline: float, base_version: int, max_attempts: int) -> list[int]:
        """:meth:`lease` of each task, in one round trip (each lease its own atomic script: a
        pipeline, not a transaction); the fences in that order."""
        if not task_ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        now = time.time()
        for task_id in task_ids:
            self._lease(keys=[keys.task(task_id), keys.PENDING, keys.LEASES, keys.FENCE, keys.COUNTERS],
                        args=[task_id, deadline, base_version, now, max_attempts], client=pipe)
        return [int(f) for f in pipe.execute()]

    def heartbeat(self, task_id: str, fence: int, deadline: float, worker_id: str = "", token_hash: str = "",
                  event: str = "") -> Renewal:
        """Extend a lease, note the worker as seen and ``event`` on the task, and fix the version
        the run trains on, in one step; a lost lease changes nothing and says why.

        With a ``token_hash`` the caller must hold the lease (the first caller of a fence takes
        it); without, nothing is checked.
        """
        reason, base, *first = self._heartbeat(
            keys=[keys.task(task_id), keys.LEASES, keys.WORKERS, keys.LATEST],
            args=[task_id, fence, deadline, worker_id, token_hash, time.time(), event[:500], MAX_EVENTS])
        if reason:
            return Renewal(_text(reason))
        return Renewal("", deadline, int(base), started=bool(first and int(first[0])))

    def problem(self, task_id: str, fence: int) -> str:
        """"" if (task, fence) holds the current lease, else a sentence saying why not."""
        return _text(self._check(keys=[keys.task(task_id)], args=[task_id, fence]))

    def hold(self, task_id: str, fence: int, worker_id: str, token_hash: str) -> str:
        """"" when this caller holds (task, fence)'s lease, taking it if no one does; else why not."""
        return _text(self._hold(keys=[keys.task(task_id)], args=[task_id, fence, worker_id, token_hash]))

    def expire(self, now: float | None = None) -> list[str]:
        """Put every task whose lease ran out back in the queue; returns their ids."""
        ids = self._expire(keys=[keys.LEASES, keys.PENDING, keys.COUNTERS], args=[now or time.time(), keys.task("")])
        return [i.decode() for i in ids]

    def release(self, task_id: str, fence: int, error: str, max_attempts: int) -> TaskState | None:
        """Give a failed task back to the queue (or fail it); None when the lease was not current."""
        state = _text(self._release(keys=[keys.task(task_id), keys.LEASES, keys.PENDING],
                                    args=[task_id, fence, error, time.time(), max_attempts]))
        return TaskState(state) if state else None

    def requeue(self, task_id: str, fence: int, why: str) -> TaskState | None:
        """Put a unit whose run was stopped, through no fault of its own, back in the queue
        without spending an attempt (a twin is retired instead); None when (task, fence) did not
        hold the lease (the unit had finished, or its lease had already gone)."""
        state = _text(self._requeue(keys=[keys.task(task_id), keys.LEASES, keys.PENDING],
                                    args=[task_id, fence, why, time.time()]))
        return TaskState(state) if state else None

    def reset(self, deadline: float) -> int:
        """Set every lease's deadline to ``deadline`` (later or earlier); returns how many.

        What a restarted coordinator does: leases that ran out while it was down never had a
        chance to be renewed (heartbeats and uploads could not reach it), and the Ray tasks its
        predecessor dispatched may be gone; every holder gets one TTL from now to show up.
        """
        leases = self.leased()
        if leases:
            pipe = self.r.pipeline(transaction=True)
            for lease in leases:
                pipe.zadd(keys.LEASES, {lease.task_id: deadline}, xx=True)
                pipe.hset(keys.task(lease.task_id), "deadline", deadline)
            pipe.execute()
        return len(leases)

    def leased(self) -> list[Lease]:
        """Every lease, the soonest to run out first."""
        return [Lease(t.decode(), s) for t, s in self.r.zrange(keys.LEASES, 0, -1, withscores=True)]

    def speculate(self, task_id: str, deadline: float) -> tuple[str, int]:
        """Lease a leased task a second time, to a twin task with its own fence: (twin id, fence).

        Fence 0 when the task is not leased or already has a twin. Whichever of the two runs
        uploads first completes both (see coordinator.ledger.adapters); the other's is refused.
        """
        twin = twin_id(task_id)
        fence = self._speculate(keys=[keys.task(task_id), keys.task(twin), keys.LEASES, keys.FENCE, keys.COUNTERS],
                                args=[task_id, twin, deadline, time.time()])
        return twin, int(fence)

    def retire_twin(self, twin: str) -> None:
        """A twin whose lease expired goes nowhere (the original still runs): not pending, failed."""
        self._retire_twin(keys=[keys.task(twin), keys.PENDING, keys.LEASES], args=[twin, "the speculative run expired"])
