"""Leases: a task is leased with a fence, kept alive by heartbeats, and given back or expired.

A fence comes from one strictly increasing counter. A lease that expires puts the task back in
the queue; the next lease gets a new fence, and anything carrying an older fence (a heartbeat, a
shard fetch, an upload) is refused. Whether (task, fence) holds the current lease is one Lua
function, :data:`CURRENT_LEASE`, that every script asking it uses.

A lease is its holder's from the moment it is granted: it records the worker the run was placed
on and the sha256 of a random secret that travels only in that run's spec. A caller over the
network proves it holds the lease with a :class:`Claim` (its worker and the secret), checked by
the same Lua function in the same step that reads the lease; anyone else is told only that it
holds no such lease (:func:`no_such_lease`), never a fence or a holder.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from coordinator.ledger import keys
from coordinator.ledger.leaders import FENCED, Fence, fence_pair, fenced, request_id
from coordinator.ledger.records import Lease, TaskState
from coordinator.ledger.tasks import COUNT, EVENT

# lease_problem(key, task id, fence, claim): "" when (task id, fence) holds the current lease of
# the task hash at ``key``, else a sentence saying why not. ``claim`` is nil for the coordinator's
# own checks; for a caller over the network it is {worker, sha256 of the lease secret, how to
# refuse}: the lease must be the one placed on that worker (or on no named worker) and granted
# with that secret, or the caller is told only that it holds no such lease (no fences, no
# holders, no states). Every script that asks this uses this function.
CURRENT_LEASE = """
local function lease_problem(key, task_id, fence, claim)
  local t = redis.call('HMGET', key, 'state', 'fence', 'holder_worker', 'lease_secret')
  if claim then
    local secret, placed = t[4] or '', t[3] or ''
    if not t[1] or t[2] ~= fence or secret == '' or secret ~= claim[2] or (placed ~= '' and placed ~= claim[1]) then
      return claim[3]
    end
  end
  if not t[1] then return "there is no task '" .. task_id .. "'" end
  if t[1] ~= 'leased' then return 'the task is ' .. t[1] .. ', not leased' end
  if t[2] ~= fence then return 'stale fence ' .. fence .. ': the lease was re-issued' end
  return ''
end
-- A claim from ARGV[i], ARGV[i+1], ARGV[i+2] (checked flag, worker, secret hash): nil when unchecked.
local function claim_at(i, task_id, fence)
  if ARGV[i] ~= '1' then return nil end
  return {ARGV[i + 1], ARGV[i + 2], 'this worker holds no lease of task ' .. task_id .. ' under fence ' .. fence}
end
"""

# KEYS: task, PENDING, LEASES, FENCE, COUNTERS, the scheduler's leader lease. ARGV: task id,
# deadline, base version, now, max attempts, request id, the worker it is placed on ("" when the
# node names none), sha256 of the lease secret, the scheduler's token (FENCED). Returns the new
# fence, 0 when the task is not pending, -1 when it ran out of attempts. Counts the lease, and a
# re-issue when the task had a fence before (coordinator.ledger.counters). The same request run
# again (the client retries a call whose reply was lost) answers the fence it granted.
_LEASE = FENCED + COUNT + """
local now = redis.call('HMGET', KEYS[1], 'state', 'lease_request', 'fence')
if now[1] == 'leased' and ARGV[6] ~= '' and now[2] == ARGV[6] then return tonumber(now[3]) end
if now[1] ~= 'pending' then return 0 end
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
           'leased_at', ARGV[4], 'attempts', attempts + 1, 'lease_request', ARGV[6],
           'holder_worker', ARGV[7], 'lease_secret', ARGV[8])
if redis.call('HGET', KEYS[1], 'pinned') ~= '1' then redis.call('HSET', KEYS[1], 'base_version', ARGV[3]) end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return fence
"""

# One heartbeat, atomically: the lease check (with the caller's claim), the new deadline, the worker seen,
# the event noted, and the version the run trains on (fixed by the first heartbeat of a lease:
# the newest version then, unless the task is pinned to one; later ones return the same).
# KEYS: task, LEASES, WORKERS, LATEST. ARGV: task id, fence, deadline, worker id, now, event (""
# for none), events kept, then the claim (checked flag, worker, secret hash). Returns {"" or why
# not, base version or -1, 1 when this beat was the lease's first (its run started) else 0}.
_HEARTBEAT = CURRENT_LEASE + EVENT + """
local problem = lease_problem(KEYS[1], ARGV[1], ARGV[2], claim_at(8, ARGV[1], ARGV[2]))
if problem ~= '' then return {problem, -1} end
redis.call('HSET', KEYS[1], 'deadline', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
if ARGV[4] ~= '' then redis.call('ZADD', KEYS[3], 'XX', ARGV[5], ARGV[4]) end
if ARGV[6] ~= '' then add_event(KEYS[1], ARGV[6], ARGV[5], ARGV[7]) end
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

# KEYS: task. ARGV: task id, fence, then the claim (checked flag, worker, secret hash). "" when
# (task, fence) holds the current lease and the claim (if checked) is its holder's, else why not.
_CHECK = CURRENT_LEASE + "return lease_problem(KEYS[1], ARGV[1], ARGV[2], claim_at(3, ARGV[1], ARGV[2]))"

# KEYS: LEASES, PENDING, COUNTERS. ARGV: now, task key prefix. Returns the ids whose lease expired
# (each counted as "leases_expired"). An abandoned lease is its holder's failing, not the task's:
# the attempt it took is given back (the scheduler charges the holder's trust instead), and the
# task keeps the worker it was placed on until it is leased again, for the scheduler to read.
_EXPIRE = COUNT + """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for _, id in ipairs(ids) do
  local t = ARGV[2] .. id
  if redis.call('HGET', t, 'state') == 'leased' then
    redis.call('HINCRBY', KEYS[3], 'leases_expired', 1)
    local attempts = tonumber(redis.call('HGET', t, 'attempts') or '1')
    count(t, 'pending')
    redis.call('HSET', t, 'state', 'pending', 'error', 'the lease expired', 'attempts', math.max(attempts - 1, 0))
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
# KEYS: task, twin, LEASES, FENCE, COUNTERS, the scheduler's leader lease. ARGV: task id, twin id,
# deadline, now, request id, the worker the twin is placed on, sha256 of its lease secret, the
# scheduler's token (FENCED). Returns the twin's fence; 0 when the task is not leased or already
# has a live twin; the same request run again, the same fence.
_SPECULATE = FENCED + COUNT + """
local again = redis.call('HMGET', KEYS[2], 'state', 'lease_request', 'fence')
if again[1] == 'leased' and ARGV[5] ~= '' and again[2] == ARGV[5] then return tonumber(again[3]) end
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
           'leased_at', ARGV[4], 'attempts', 1000000, 'counted', 'twin', 'lease_request', ARGV[5],
           'holder_worker', ARGV[6], 'lease_secret', ARGV[7])
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


def no_such_lease(task_id: str, fence: int) -> str:
    """What anyone but a lease's holder is told about it (the scripts' ``claim_at`` says the same)."""
    return f"this worker holds no lease of task {task_id} under fence {fence}"


def secret_hash(secret: str) -> str:
    """How the ledger keeps a lease secret: its sha256 (a read of Redis gives no one a lease)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    """A lease secret: 128 random bits, handed only to the run the lease is placed on."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class Claim:
    """A caller's claim to hold a lease: the worker it acts for (one its credential registered;
    "" when it names none) and the lease secret its run's spec carried. The ledger honours it only
    for the lease placed on that worker with that secret."""

    worker_id: str
    secret: str


def claim_args(claim: Claim | None) -> list[str]:
    """The scripts' claim arguments (``claim_at``): None checks nothing (the coordinator itself)."""
    if claim is None:
        return ["0", "", ""]
    return ["1", claim.worker_id, secret_hash(claim.secret)]


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
        self._expire = client.register_script(_EXPIRE)
        self._release = client.register_script(_RELEASE)
        self._requeue = client.register_script(_REQUEUE)
        self._speculate = client.register_script(_SPECULATE)
        self._retire_twin = client.register_script(_RETIRE_TWIN)

    def pending(self, limit: int = 100) -> list[str]:
        """The oldest pending task ids, first queued first."""
        return [t.decode() for t in self.r.zrange(keys.PENDING, 0, limit - 1)]

    def lease(self, task_id: str, deadline: float, base_version: int, max_attempts: int, worker_id: str = "",
              secret: str = "", now: float | None = None, leader: Fence | None = None) -> int:
        """Lease a pending task to the run placed on ``worker_id`` ("" for a node that names no
        worker), which proves it holds the lease with ``secret`` (a lease granted without one can
        be renewed or used by no caller over the network); returns its new fence, 0 if not
        pending, -1 if it has failed. ``now``: when it is granted, by the scheduler's clock (the
        clock that measures the card's speed from it).

        With ``leader`` (the scheduler's fence) the lease is granted only while that fence leads
        (NotLeader otherwise). Safe to retry: the call carries a request id, and a retry of a
        call that took effect gets the fence it granted."""
        return self.lease_many([(task_id, worker_id, secret)], deadline, base_version, max_attempts, now, leader)[0]

    def lease_many(self, grants: list[tuple[str, str, str]], deadline: float | Sequence[float], base_version: int,
                   max_attempts: int, now: float | None = None, leader: Fence | None = None) -> list[int]:
        """:meth:`lease` each (task id, worker id, secret), in one round trip (each lease its own
        atomic, fenced, retry-safe script: a pipeline, not a transaction); the fences in that order.
        ``deadline``: one for all, or each grant's own (in the grants' order)."""
        if not grants:
            return []
        deadlines = [deadline] * len(grants) if isinstance(deadline, (int, float)) else list(deadline)
        if len(deadlines) != len(grants):
            raise ValueError(f"{len(deadlines)} deadlines for {len(grants)} leases")
        lead_key, token = fence_pair("scheduler", leader)
        now = now or time.time()
        pipe = self.r.pipeline(transaction=False)
        for (task_id, worker_id, secret), until in zip(grants, deadlines):
            self._lease(keys=[keys.task(task_id), keys.PENDING, keys.LEASES, keys.FENCE, keys.COUNTERS, lead_key],
                        args=[task_id, until, base_version, now, max_attempts, request_id(), worker_id,
                              secret_hash(secret) if secret else "", token], client=pipe)
        return [int(f) for f in fenced(pipe.execute)]

    def heartbeat(self, task_id: str, fence: int, deadline: float, worker_id: str = "", claim: Claim | None = None,
                  event: str = "") -> Renewal:
        """Extend a lease, note ``worker_id`` as seen and ``event`` on the task, and fix the version
        the run trains on, in one step; a lost lease changes nothing and says why.

        With a ``claim`` the caller must be the lease's holder (its worker and secret), else it
        is told only that it holds no such lease; without, nothing is checked.
        """
        reason, base, *first = self._heartbeat(
            keys=[keys.task(task_id), keys.LEASES, keys.WORKERS, keys.LATEST],
            args=[task_id, fence, deadline, worker_id, time.time(), event[:500], MAX_EVENTS, *claim_args(claim)])
        if reason:
            return Renewal(_text(reason))
        return Renewal("", deadline, int(base), started=bool(first and int(first[0])))

    def problem(self, task_id: str, fence: int, claim: Claim | None = None) -> str:
        """"" if (task, fence) holds the current lease (and ``claim``, when given, is its
        holder's), else a sentence saying why not (to a claim not its holder's, only
        :func:`no_such_lease`)."""
        return _text(self._check(keys=[keys.task(task_id)], args=[task_id, fence, *claim_args(claim)]))

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

    def speculate(self, task_id: str, deadline: float, worker_id: str = "", secret: str = "",
                  now: float | None = None, leader: Fence | None = None) -> tuple[str, int]:
        """Lease a leased task a second time, to a twin task with its own fence, placed on
        ``worker_id`` with ``secret`` (as :meth:`lease`): (twin id, fence).

        Fence 0 when the task is not leased or already has a twin. Whichever of the two runs
        uploads first completes both (see coordinator.ledger.adapters); the other's is refused.
        Fenced by ``leader`` and safe to retry, as :meth:`lease` is.
        """
        twin = twin_id(task_id)
        lead_key, token = fence_pair("scheduler", leader)
        fence = fenced(lambda: self._speculate(
            keys=[keys.task(task_id), keys.task(twin), keys.LEASES, keys.FENCE, keys.COUNTERS, lead_key],
            args=[task_id, twin, deadline, now or time.time(), request_id(), worker_id,
                  secret_hash(secret) if secret else "", token]))
        return twin, int(fence)

    def retire_twin(self, twin: str) -> None:
        """A twin whose lease expired goes nowhere (the original still runs): not pending, failed."""
        self._retire_twin(keys=[keys.task(twin), keys.PENDING, keys.LEASES], args=[twin, "the speculative run expired"])
