"""The job ledger: all coordinator state, kept in Redis.

Guarantees (see DESIGN.md, "Ledger"):

* Every transition that touches several keys is atomic: a Lua script, or WATCH/MULTI.
* A task is leased with a fencing token from one strictly increasing counter. A lease that
  expires puts the task back in the queue; the next lease gets a new fence, and anything
  carrying an older fence (a heartbeat, a shard fetch, an upload) is refused.
* An upload is accepted at most once per (task, fence, sha256): the adapter id is derived from
  those three, so a retried upload finds its own earlier acceptance and is told so.
* A version is published, and its adapters leave the fold buffer, in one transaction: an adapter
  is never folded twice, and a coordinator that dies mid-fold folds the same buffer again.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis

from coordinator import keys
from nomoat.lineage import Lineage

TASK_STATES = ("pending", "leased", "done", "failed")

# KEYS: task, PENDING, LEASES, FENCE. ARGV: task id, deadline, base version, now, max attempts.
# Returns the new fence, 0 when the task is not pending, -1 when it ran out of attempts.
_LEASE = """
if redis.call('HGET', KEYS[1], 'state') ~= 'pending' then return 0 end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if attempts >= tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[1], 'state', 'failed', 'finished', ARGV[4])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return -1
end
local fence = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[1], 'state', 'leased', 'fence', fence, 'deadline', ARGV[2],
           'base_version', ARGV[3], 'leased_at', ARGV[4], 'attempts', attempts + 1)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return fence
"""

# Who holds a lease: the first caller of a fence (its token hash, and its worker id once one is
# named) holds it; later calls under that fence must come from the same token and worker. KEYS[1]
# is the task. An empty token checks nothing (admin, or the coordinator itself).
_HOLD = """
local function hold(fence, worker, token)
  if token == '' then return '' end
  if redis.call('HGET', KEYS[1], 'holder_fence') ~= fence then
    redis.call('HSET', KEYS[1], 'holder_fence', fence, 'holder_token', token, 'holder_worker', worker)
    return ''
  end
  if redis.call('HGET', KEYS[1], 'holder_token') ~= token then
    return 'the task is leased to another worker (another token holds its lease)'
  end
  local held = redis.call('HGET', KEYS[1], 'holder_worker')
  if worker ~= '' and held == '' then redis.call('HSET', KEYS[1], 'holder_worker', worker)
  elseif worker ~= '' and held ~= worker then return 'the task is leased to worker ' .. held .. ', not ' .. worker
  end
  return ''
end
"""

# KEYS: task, LEASES. ARGV: task id, fence, new deadline, worker id, token hash (see _HOLD).
_HEARTBEAT = _HOLD + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return "there is no task '" .. ARGV[1] .. "'" end
if state ~= 'leased' then return 'the task is ' .. state .. ', not leased' end
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[2] then return 'the lease was re-issued (stale fence)' end
local refused = hold(ARGV[2], ARGV[4], ARGV[5])
if refused ~= '' then return refused end
redis.call('HSET', KEYS[1], 'deadline', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return ''
"""

# KEYS: task. ARGV: task id, fence, worker id, token hash. "" when the caller holds the current
# lease (claiming it if no one does), else why not.
_HOLD_LEASE = _HOLD + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return "there is no task '" .. ARGV[1] .. "'" end
if state ~= 'leased' then return 'task ' .. ARGV[1] .. ' is ' .. state .. ', not leased' end
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[2] then return 'the lease was re-issued (stale fence)' end
return hold(ARGV[2], ARGV[3], ARGV[4])
"""

# KEYS: task. ARGV: fence, newest version. The first call of a lease fixes the version the run
# trains on; later calls return the same. Returns -1 when the fence is not the current lease.
_CLAIM = """
if redis.call('HGET', KEYS[1], 'state') ~= 'leased' or redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then
  return -1
end
if redis.call('HGET', KEYS[1], 'claimed') ~= ARGV[1] then
  redis.call('HSET', KEYS[1], 'claimed', ARGV[1], 'base_version', ARGV[2])
end
return tonumber(redis.call('HGET', KEYS[1], 'base_version'))
"""

# KEYS: LEASES, PENDING. ARGV: now, task key prefix. Returns the ids whose lease expired.
_EXPIRE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for _, id in ipairs(ids) do
  local t = ARGV[2] .. id
  if redis.call('HGET', t, 'state') == 'leased' then
    redis.call('HSET', t, 'state', 'pending', 'error', 'the lease expired')
    redis.call('ZADD', KEYS[2], ARGV[1], id)
  end
  redis.call('ZREM', KEYS[1], id)
end
return ids
"""

# KEYS: task, LEASES, PENDING. ARGV: task id, fence, error, now, max attempts.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'state') ~= 'leased' then return '' end
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[2] then return '' end
redis.call('ZREM', KEYS[2], ARGV[1])
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if attempts >= tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[1], 'state', 'failed', 'error', ARGV[3], 'finished', ARGV[4])
  return 'failed'
end
redis.call('HSET', KEYS[1], 'state', 'pending', 'error', ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
return 'pending'
"""

# KEYS: task, LEASES, adapter, FOLD_BUFFER, worker, partner, PENDING. ARGV: task id, fence, adapter id,
# now, partner id, then field/value pairs for the adapter hash. Returns {status, adapter id or
# reason}. The partner is the task's speculative twin (or the twin's original, see _SPECULATE):
# the first accepted result marks both done, so the other run's upload is refused.
_ACCEPT = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'done' then
  if redis.call('HGET', KEYS[1], 'adapter') == ARGV[3] then return {'duplicate', ARGV[3]} end
  return {'refused', 'the task is already done: a result from another lease was accepted'}
end
if state ~= 'leased' then return {'refused', 'the task is ' .. tostring(state) .. ', not leased'} end
local fence = redis.call('HGET', KEYS[1], 'fence')
if fence ~= ARGV[2] then
  return {'refused', 'stale fence ' .. ARGV[2] .. ': the lease was re-issued with fence ' .. fence}
end
redis.call('HSET', KEYS[1], 'state', 'done', 'adapter', ARGV[3], 'finished', ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[5] ~= '' and redis.call('HGET', KEYS[6], 'state') ~= 'done' then
  redis.call('HSET', KEYS[6], 'state', 'done', 'adapter', ARGV[3], 'finished', ARGV[4])
  redis.call('ZREM', KEYS[2], ARGV[5])
  redis.call('ZREM', KEYS[7], ARGV[5])
end
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[3], 'state', 'buffered', 'accepted', ARGV[4])
redis.call('RPUSH', KEYS[4], ARGV[3])
if redis.call('EXISTS', KEYS[5]) == 1 then redis.call('HINCRBY', KEYS[5], 'tasks_done', 1) end
return {'accepted', ARGV[3]}
"""


# Speculation: a second lease on a leased task, held by a twin task "<id>.spec" with its own fence
# (so heartbeats, shard fetches, claims and lease holders work unchanged). The twin is not one of
# the job's tasks; its attempts are spent, so if it fails or expires it is retired, never re-run.
# KEYS: task, twin, LEASES, FENCE. ARGV: task id, twin id, deadline, now.
# Returns the twin's fence; 0 when the task is not leased or already has a live twin.
_SPECULATE = """
if redis.call('HGET', KEYS[1], 'state') ~= 'leased' then return 0 end
if redis.call('HGET', KEYS[1], 'twin_of') then return 0 end
if redis.call('HGET', KEYS[2], 'state') == 'leased' or redis.call('HGET', KEYS[2], 'state') == 'done' then
  return 0
end
local fence = redis.call('INCR', KEYS[4])
local t = redis.call('HMGET', KEYS[1], 'job', 'start', 'end', 'index', 'tokens')
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'task_id', ARGV[2], 'job', t[1], 'start', t[2], 'end', t[3], 'index', t[4],
           'tokens', t[5], 'twin_of', ARGV[1], 'state', 'leased', 'fence', fence, 'deadline', ARGV[3],
           'leased_at', ARGV[4], 'attempts', 1000000)
redis.call('HSET', KEYS[1], 'twin', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
return fence
"""

# KEYS: task. ARGV: event, now, how many to keep. Appends to the task's "events" (JSON list).
_EVENT = """
local events = cjson.decode(redis.call('HGET', KEYS[1], 'events') or '[]')
table.insert(events, {ARGV[2], ARGV[1]})
while #events > tonumber(ARGV[3]) do table.remove(events, 1) end
redis.call('HSET', KEYS[1], 'events', cjson.encode(events))
return #events
"""

# KEYS: worker. ARGV: tokens, seconds. Measured speed: total tokens over total training seconds.
_SPEED = """
local tokens = redis.call('HINCRBYFLOAT', KEYS[1], 'tokens_trained', ARGV[1])
local seconds = redis.call('HINCRBYFLOAT', KEYS[1], 'train_seconds', ARGV[2])
local speed = tonumber(tokens) / math.max(tonumber(seconds), 1e-6)
redis.call('HSET', KEYS[1], 'tokens_per_s', tostring(speed))
return tostring(speed)
"""


class TooManyWorkers(Exception):
    """A token already has as many active workers as it may."""

    def __init__(self, active: int) -> None:
        super().__init__(f"{active} active workers")
        self.active = active


@dataclass(frozen=True)
class Accepted:
    status: str  # accepted | duplicate | refused
    detail: str  # the adapter id, or the reason for a refusal

    @property
    def ok(self) -> bool:
        return self.status in ("accepted", "duplicate")


def adapter_id_for(task_id: str, fence: int, sha256: str) -> str:
    """Deterministic, so a retried upload of the same result maps onto the same adapter."""
    return hashlib.sha256(f"{task_id}/{fence}/{sha256}".encode()).hexdigest()[:20]


def _decode(mapping: dict[bytes | str, Any]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in mapping.items()
    }


class Ledger:
    """Coordinator state in Redis. Thread-safe: every method is one or a few Redis round trips."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._lease = client.register_script(_LEASE)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._hold = client.register_script(_HOLD_LEASE)
        self._claim = client.register_script(_CLAIM)
        self._expire = client.register_script(_EXPIRE)
        self._release = client.register_script(_RELEASE)
        self._accept = client.register_script(_ACCEPT)
        self._speculate = client.register_script(_SPECULATE)
        self._event = client.register_script(_EVENT)
        self._speed = client.register_script(_SPEED)

    # -- jobs ---------------------------------------------------------------------------------

    def create_job(self, job_id: str, fields: dict[str, Any], tasks: list[dict[str, Any]]) -> None:
        """Record a job and its tasks, all pending, in one transaction."""
        now = time.time()
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(keys.job(job_id), mapping={**_str_fields(fields), "state": "running", "created": now})
        pipe.zadd(keys.JOBS, {job_id: now})
        pipe.zadd(keys.RUNNING_JOBS, {job_id: now})
        for i, task in enumerate(tasks):
            task_id = task["task_id"]
            pipe.hset(
                keys.task(task_id),
                mapping={**_str_fields(task), "job": job_id, "state": "pending", "attempts": 0, "fence": 0},
            )
            pipe.rpush(keys.job_tasks(job_id), task_id)
            pipe.zadd(keys.PENDING, {task_id: now + i * 1e-6})
        pipe.execute()

    def job(self, job_id: str) -> dict[str, str] | None:
        data = _decode(self.r.hgetall(keys.job(job_id)))
        return data or None

    def job_ids(self) -> list[str]:
        return [j.decode() for j in self.r.zrange(keys.JOBS, 0, -1)]

    def running_job_ids(self) -> list[str]:
        """The jobs still running, oldest first: what the scheduler and folder loops look at each
        tick, however many finished jobs the ledger holds."""
        return [j.decode() for j in self.r.zrange(keys.RUNNING_JOBS, 0, -1)]

    def index_running_jobs(self) -> int:
        """Rebuild the running-jobs index from the job records (a ledger written before it
        existed); how many jobs it lists."""
        jobs = self.r.zrange(keys.JOBS, 0, -1, withscores=True)
        pipe = self.r.pipeline(transaction=False)
        for job_id, _ in jobs:
            pipe.hget(keys.job(job_id.decode()), "state")
        running = {job_id: created for (job_id, created), state in zip(jobs, pipe.execute()) if state == b"running"}
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(keys.RUNNING_JOBS)
        if running:
            pipe.zadd(keys.RUNNING_JOBS, running)
        pipe.execute()
        return len(running)

    def set_job(self, job_id: str, **fields: Any) -> None:
        """Update a job's fields; a job leaving state "running" leaves the running index with it."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(keys.job(job_id), mapping=_str_fields(fields))
        if "state" in fields and fields["state"] != "running":
            pipe.zrem(keys.RUNNING_JOBS, job_id)
        pipe.execute()

    def task_ids(self, job_id: str) -> list[str]:
        return [t.decode() for t in self.r.lrange(keys.job_tasks(job_id), 0, -1)]

    def task(self, task_id: str) -> dict[str, str] | None:
        data = _decode(self.r.hgetall(keys.task(task_id)))
        return data or None

    def tasks(self, job_id: str) -> list[dict[str, str]]:
        pipe = self.r.pipeline(transaction=False)
        for task_id in self.task_ids(job_id):
            pipe.hgetall(keys.task(task_id))
        return [_decode(t) for t in pipe.execute()]

    def task_counts(self, job_id: str) -> dict[str, int]:
        return count_states(self.tasks(job_id))

    # -- leases -------------------------------------------------------------------------------

    def pending(self, limit: int = 100) -> list[str]:
        return [t.decode() for t in self.r.zrange(keys.PENDING, 0, limit - 1)]

    def lease(self, task_id: str, deadline: float, base_version: int, max_attempts: int) -> int:
        """Lease a pending task; returns its new fence, 0 if not pending, -1 if it has failed."""
        return int(
            self._lease(
                keys=[keys.task(task_id), keys.PENDING, keys.LEASES, keys.FENCE],
                args=[task_id, deadline, base_version, time.time(), max_attempts],
            )
        )

    def heartbeat(self, task_id: str, fence: int, deadline: float, worker_id: str = "", token_hash: str = "") -> str:
        """Extend a lease; returns "" when extended, else why not.

        With a ``token_hash`` the caller must hold the lease (the first caller of a fence takes
        it); without, nothing is checked.
        """
        reason = self._heartbeat(keys=[keys.task(task_id), keys.LEASES],
                                 args=[task_id, fence, deadline, worker_id, token_hash])
        return reason.decode() if isinstance(reason, bytes) else reason

    def hold(self, task_id: str, fence: int, worker_id: str, token_hash: str) -> str:
        """"" when this caller holds (task, fence)'s lease, taking it if no one does; else why not."""
        reason = self._hold(keys=[keys.task(task_id)], args=[task_id, fence, worker_id, token_hash])
        return reason.decode() if isinstance(reason, bytes) else reason

    def claim(self, task_id: str, fence: int, newest_version: int) -> int:
        """The version this lease's run trains on, fixed at its first claim; -1 if not the lease."""
        return int(self._claim(keys=[keys.task(task_id)], args=[fence, newest_version]))

    def lease_problem(self, task_id: str, fence: int) -> str:
        """"" if (task, fence) holds the current lease, else a sentence saying why not."""
        task = self.task(task_id)
        if task is None:
            return f"there is no task {task_id!r}"
        if task["state"] != "leased":
            return f"task {task_id} is {task['state']}, not leased"
        if int(task["fence"]) != fence:
            return f"stale fence {fence}: the lease of task {task_id} was re-issued with fence {task['fence']}"
        return ""

    def expire_leases(self, now: float | None = None) -> list[str]:
        ids = self._expire(keys=[keys.LEASES, keys.PENDING], args=[now or time.time(), keys.task("")])
        return [i.decode() for i in ids]

    def release(self, task_id: str, fence: int, error: str, max_attempts: int) -> str:
        """Give a failed task back to the queue (or fail it); "" when the lease was not current."""
        state = self._release(
            keys=[keys.task(task_id), keys.LEASES, keys.PENDING],
            args=[task_id, fence, error, time.time(), max_attempts],
        )
        return state.decode() if isinstance(state, bytes) else state

    def reset_leases(self, deadline: float) -> int:
        """Set every lease's deadline to ``deadline`` (later or earlier); returns how many.

        What a restarted coordinator does: leases that ran out while it was down never had a
        chance to be renewed (heartbeats and uploads could not reach it), and the Ray tasks its
        predecessor dispatched may be gone; every holder gets one TTL from now to show up.
        """
        leases = self.leased()
        if leases:
            pipe = self.r.pipeline(transaction=True)
            for task_id, _ in leases:
                pipe.zadd(keys.LEASES, {task_id: deadline}, xx=True)
                pipe.hset(keys.task(task_id), "deadline", deadline)
            pipe.execute()
        return len(leases)

    def leased(self) -> list[tuple[str, float]]:
        return [(t.decode(), s) for t, s in self.r.zrange(keys.LEASES, 0, -1, withscores=True)]

    def tasks_by_id(self, task_ids: list[str]) -> list[dict[str, str]]:
        """The tasks named, in that order (one round trip); a task that is gone is left out."""
        pipe = self.r.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hgetall(keys.task(task_id))
        return [t for t in (_decode(d) for d in pipe.execute()) if t]

    def set_task(self, task_id: str, **fields: Any) -> None:
        self.r.hset(keys.task(task_id), mapping=_str_fields(fields))

    def add_task_event(self, task_id: str, event: str, keep: int = 32) -> None:
        """Record something about a task's run (an out-of-memory retry, say) on the task."""
        self._event(keys=[keys.task(task_id)], args=[event[:500], time.time(), keep])

    def task_events(self, task_id: str) -> list[tuple[float, str]]:
        raw = self.r.hget(keys.task(task_id), "events")
        return [(float(t), e) for t, e in json.loads(raw)] if raw else []

    def speculate(self, task_id: str, deadline: float) -> tuple[str, int]:
        """Lease a leased task a second time, to a twin task with its own fence: (twin id, fence).

        Fence 0 when the task is not leased or already has a twin. Whichever of the two runs
        uploads first completes both (see _ACCEPT); the other's upload is refused.
        """
        twin = twin_id(task_id)
        fence = self._speculate(keys=[keys.task(task_id), keys.task(twin), keys.LEASES, keys.FENCE],
                                args=[task_id, twin, deadline, time.time()])
        return twin, int(fence)

    def retire_twin(self, twin: str) -> None:
        """A twin whose lease expired goes nowhere (the original still runs): not pending, failed."""
        pipe = self.r.pipeline(transaction=True)
        pipe.zrem(keys.PENDING, twin)
        pipe.zrem(keys.LEASES, twin)
        pipe.hset(keys.task(twin), mapping={"state": "failed", "error": "the speculative run expired"})
        pipe.execute()

    # -- adapters -----------------------------------------------------------------------------

    def accept_upload(
        self, task_id: str, fence: int, sha256: str, fields: dict[str, Any], worker_id: str = ""
    ) -> Accepted:
        adapter_id = adapter_id_for(task_id, fence, sha256)
        task = self.task(task_id)
        if task is None:
            return Accepted("refused", f"there is no task {task_id!r}")
        flat: list[Any] = []
        for k, v in _str_fields({**fields, "task": task_id, "fence": fence, "sha256": sha256,
                                 "job": task["job"], "worker": worker_id}).items():
            flat += [k, v]
        partner = task.get("twin") or task.get("twin_of") or ""
        status, detail = self._accept(
            keys=[keys.task(task_id), keys.LEASES, keys.adapter(adapter_id), keys.FOLD_BUFFER,
                  keys.worker(worker_id) if worker_id else keys.worker("-"), keys.task(partner or "-"),
                  keys.PENDING],
            args=[task_id, fence, adapter_id, time.time(), partner, *flat],
        )
        return Accepted(status.decode(), detail.decode())

    def adapter(self, adapter_id: str) -> dict[str, str] | None:
        data = _decode(self.r.hgetall(keys.adapter(adapter_id)))
        return data or None

    def buffered(self) -> list[dict[str, str]]:
        """Adapters accepted and waiting to be folded, oldest first."""
        ids = [a.decode() for a in self.r.lrange(keys.FOLD_BUFFER, 0, -1)]
        pipe = self.r.pipeline(transaction=False)
        for adapter_id in ids:
            pipe.hgetall(keys.adapter(adapter_id))
        return [{**_decode(a), "adapter_id": i} for i, a in zip(ids, pipe.execute())]

    def reject_adapter(self, adapter_id: str, reason: str) -> None:
        adapter = self.adapter(adapter_id) or {}
        pipe = self.r.pipeline(transaction=True)
        pipe.lrem(keys.FOLD_BUFFER, 0, adapter_id)
        pipe.hset(keys.adapter(adapter_id), mapping={"state": "rejected", "reason": reason})
        if adapter.get("job"):
            pipe.hincrby(keys.job(adapter["job"]), "adapters_rejected", 1)
        pipe.execute()

    def mark_unmerged(self, adapter_id: str, version: int) -> None:
        self.r.hset(keys.adapter(adapter_id), mapping={"state": "unmerged", "unmerged_in": version})

    def recent_norms(self, limit: int = 64) -> list[float]:
        return [float(x) for x in self.r.lrange(keys.RECENT_NORMS, 0, limit - 1)]

    # -- versions -----------------------------------------------------------------------------

    def latest_version(self) -> int | None:
        value = self.r.get(keys.LATEST)
        return None if value is None else int(value)

    def version(self, number: int) -> dict[str, Any] | None:
        data = _decode(self.r.hgetall(keys.version(number)))
        if not data:
            return None
        return _version_record(number, data)

    def versions(self) -> list[dict[str, Any]]:
        numbers = [int(v) for v in self.r.zrange(keys.VERSIONS, 0, -1)]
        pipe = self.r.pipeline(transaction=False)
        for n in numbers:
            pipe.hgetall(keys.version(n))
        return [_version_record(n, _decode(d)) for n, d in zip(numbers, pipe.execute())]

    def lineage(self) -> Lineage | None:
        """The model lineage fixed with version 0 (None for a ledger that has none yet)."""
        raw = self.r.get(keys.LINEAGE)
        return None if raw is None else Lineage.from_json(raw)

    def fix_lineage(self, lineage: Lineage) -> Lineage:
        """Record ``lineage`` unless one is recorded already (SET NX: the first writer wins, so
        coordinators sharing a ledger agree); returns the lineage that holds."""
        self.r.set(keys.LINEAGE, lineage.to_json(), nx=True)
        return self.lineage()

    def set_version_files(self, number: int, files: dict[str, str]) -> None:
        """Record a snapshot (a Hugging Face folder in the blob store) made for a version later."""
        self.r.hset(keys.version(number), "files", json.dumps(files))

    def publish_version(
        self,
        number: int,
        record: dict[str, Any],
        folded: list[tuple[str, float]] = (),
        norms: list[float] = (),
    ) -> None:
        """Publish version ``number`` and take its adapters out of the buffer, atomically.

        Refuses (ValueError) unless ``number`` is exactly one past the newest version, so two
        coordinators racing to fold cannot both publish.
        """
        with self.r.pipeline(transaction=True) as pipe:
            pipe.watch(keys.LATEST)
            latest = pipe.get(keys.LATEST)
            expected = 0 if latest is None else int(latest) + 1
            if number != expected:
                raise ValueError(f"version {number} cannot be published: the next version is {expected}")
            jobs = [pipe.hget(keys.adapter(a), "job") for a, _ in folded]
            pipe.multi()
            pipe.hset(keys.version(number), mapping=_str_fields({**record, "created": time.time()}))
            pipe.zadd(keys.VERSIONS, {str(number): number})
            pipe.set(keys.LATEST, number)
            for (adapter_id, weight), job in zip(folded, jobs):
                pipe.lrem(keys.FOLD_BUFFER, 0, adapter_id)
                pipe.hset(keys.adapter(adapter_id), mapping={"state": "folded", "version": number, "weight": weight})
                if job:
                    pipe.hincrby(keys.job(job.decode()), "adapters_folded", 1)
            for norm in norms:
                pipe.lpush(keys.RECENT_NORMS, norm)
            pipe.ltrim(keys.RECENT_NORMS, 0, 255)
            pipe.execute()

    # -- workers ------------------------------------------------------------------------------

    def admit_worker(self, requested_id: str, fields: dict[str, Any], *, active_since: float,
                     most: int) -> tuple[str, bool]:
        """Register a worker; returns (its id, whether it rejoined under ``requested_id``).

        A worker keeps the id it asks for only if the same token (``fields["token"]``) registered
        it. A new one is refused (:class:`TooManyWorkers`) once its token has ``most`` workers
        seen since ``active_since``; two registrations racing may both pass, a bound not a quota.
        """
        token = str(fields.get("token", ""))
        known = self.worker(requested_id) if requested_id else None
        rejoining = known is not None and known.get("token") == token
        if not rejoining:
            active = sum(1 for w in self.workers()
                         if w.get("token") == token and float(w.get("last_seen") or 0) >= active_since)
            if active >= most:
                raise TooManyWorkers(active)
        worker_id = requested_id if rejoining else "w-" + secrets.token_hex(4)
        self.register_worker(worker_id, fields)
        return worker_id, rejoining

    def register_worker(self, worker_id: str, fields: dict[str, Any]) -> None:
        """Record a worker; one registering again keeps its counters, and its measured speed
        unless its card changed."""
        now = time.time()
        card = self.r.hget(keys.worker(worker_id), "card")
        pipe = self.r.pipeline(transaction=True)
        if card is not None and card.decode() != str(fields.get("card", "")):
            pipe.hdel(keys.worker(worker_id), "tokens_trained", "train_seconds", "tokens_per_s")
        pipe.hset(keys.worker(worker_id), mapping=_str_fields({**fields, "registered": now}))
        pipe.hsetnx(keys.worker(worker_id), "tasks_done", 0)
        pipe.zadd(keys.WORKERS, {worker_id: now})
        pipe.execute()

    def worker(self, worker_id: str) -> dict[str, str] | None:
        data = _decode(self.r.hgetall(keys.worker(worker_id)))
        return data or None

    def record_speed(self, worker_id: str, tokens: int, seconds: float) -> float:
        """Add a finished run to the worker's measured tokens per second; returns the new figure."""
        if not worker_id or seconds <= 0:
            return 0.0
        return float(self._speed(keys=[keys.worker(worker_id)], args=[tokens, seconds]))

    def touch_worker(self, worker_id: str) -> None:
        if worker_id:
            self.r.zadd(keys.WORKERS, {worker_id: time.time()}, xx=True)

    def workers(self) -> list[dict[str, str]]:
        entries = self.r.zrange(keys.WORKERS, 0, -1, withscores=True)
        pipe = self.r.pipeline(transaction=False)
        for worker_id, _ in entries:
            pipe.hgetall(keys.worker(worker_id.decode()))
        return [
            {**_decode(w), "worker_id": wid.decode(), "last_seen": str(seen)}
            for (wid, seen), w in zip(entries, pipe.execute())
        ]


def twin_id(task_id: str) -> str:
    """The id of a task's speculative twin (see Ledger.speculate)."""
    return f"{task_id}.spec"


def is_twin(task_id: str) -> bool:
    return task_id.endswith(".spec")


def count_states(tasks: list[dict[str, str]]) -> dict[str, int]:
    """How many of ``tasks`` are in each state (every state present, zero or more)."""
    counts = dict.fromkeys(TASK_STATES, 0)
    for task in tasks:
        counts[task["state"]] = counts.get(task["state"], 0) + 1
    return counts


def _str_fields(fields: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in fields.items():
        if isinstance(value, (dict, list, tuple)):
            out[key] = json.dumps(value)
        elif isinstance(value, bool):
            out[key] = "1" if value else "0"
        else:
            out[key] = str(value)
    return out


def _version_record(number: int, data: dict[str, str]) -> dict[str, Any]:
    record: dict[str, Any] = dict(data)
    record["version"] = number
    for key in ("files", "adapters", "metrics"):
        if key in record:
            record[key] = json.loads(record[key])
    record["parent"] = int(record.get("parent", -1))
    record["eval_loss"] = float(record.get("eval_loss", "nan"))
    return record
