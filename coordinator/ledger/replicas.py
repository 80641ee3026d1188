"""Replica groups: a replicated task's runs and the adapters they handed in, until settled.

A sample of tasks is run more than once, each run by another volunteer, with the same seed,
shard and base version (coordinator.schedule.replication decides which, and how the runs are compared).
The first adapter of such a task is accepted *held* (not buffered), in the same step that opens
the group and its first replica run (:data:`HOLD_RESULT`, run inside the acceptance script of
coordinator.ledger.adapters). A replica run is a task of its own, with an id made as the job's
task ids are (:func:`replica_id`: nothing in its spec tells a volunteer it is a check) and its
own lease and fence; it repeats the task's shard, avoids the volunteers whose runs it checks, and
keeps the base version it was given (``pinned``). It is not one of the job's tasks.

:meth:`Replicas.settle` ends a group in one transaction: at most one adapter of it goes to the
fold buffer, the others become replicas or are rejected, and the volunteers' trust records count
the outcome. A group is settled once (its state is watched), so nothing of it is folded twice.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from coordinator.ledger import keys
from coordinator.ledger.codec import decode, replica_group_from_hash
from coordinator.ledger.counters import Counters, Refusal
from coordinator.ledger.records import AdapterState, ReplicaGroup, TaskState
from coordinator.ledger.tasks import new_task_id
from coordinator.ledger.trust import Trust

# open_run(group, task key, run key, PENDING, task id, run id, now, avoid JSON, base version):
# a pending replica run that repeats the task's shard, pinned to the base version, avoiding those
# volunteers, first in the queue (the adapters it checks are held until it is in, and grow stale
# meanwhile); listed in the group's runs. Nothing when the run exists already.
OPEN_RUN = """
local function open_run(group, task_key, run_key, pending, task_id, run, now, avoid, base)
  if redis.call('EXISTS', run_key) == 1 then return end
  local t = redis.call('HMGET', task_key, 'job', 'index', 'start', 'end', 'tokens', 'vram_floors')
  redis.call('HSET', run_key, 'task_id', run, 'job', t[1] or '', 'index', t[2] or '0', 'start', t[3] or '0',
             'end', t[4] or '0', 'tokens', t[5] or '0', 'vram_floors', t[6] or '{}', 'state', 'pending',
             'attempts', '0', 'fence', '0', 'replica_of', task_id, 'avoid', avoid, 'pinned', '1',
             'base_version', base)
  redis.call('ZADD', pending, 0, run)  -- ahead of the queue: a held adapter waits on it
  local runs = cjson.decode(redis.call('HGET', group, 'runs') or '[]')
  table.insert(runs, run)
  redis.call('HSET', group, 'runs', cjson.encode(runs))
end
"""

# hold_result(group, task key, run key, REPLICATED, PENDING, task id, run id, adapter id, now,
# run to open, avoid JSON, base version): the adapter that run handed in joins the task's group
# (opened now if it is the first), and the run named is opened.
HOLD_RESULT = OPEN_RUN + """
local function hold_result(group, task_key, run_key, replicated, pending, task_id, run, adapter, now, open,
                           avoid, base)
  if redis.call('EXISTS', group) == 0 then
    redis.call('HSET', group, 'task', task_id, 'job', redis.call('HGET', task_key, 'job') or '',
               'base_version', base, 'state', 'open', 'opened', now, 'runs', '[]', 'results', '{}')
    redis.call('ZADD', replicated, now, task_id)
  end
  local results = cjson.decode(redis.call('HGET', group, 'results') or '{}')
  results[run] = adapter
  redis.call('HSET', group, 'results', cjson.encode(results))
  if open ~= '' then open_run(group, task_key, run_key, pending, task_id, open, now, avoid, base) end
end
"""

# KEYS: group, task, run, PENDING. ARGV: task id, run id, now, avoid JSON. 1 when opened; 0 when
# the group is not open (settled meanwhile) or the run exists.
_ADD_RUN = OPEN_RUN + """
if redis.call('HGET', KEYS[1], 'state') ~= 'open' or redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
open_run(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
         redis.call('HGET', KEYS[1], 'base_version'))
return 1
"""


@dataclass(frozen=True)
class Hold:
    """How an accepted adapter joins a replica group: ``task`` is the replicated task ("": it is
    not replicated); ``open`` the replica run its acceptance opens, avoiding ``avoid``."""

    task: str
    open: str = ""
    avoid: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settlement:
    """How a group ends: the adapter to fold (at most one), those that agreed with it and are not
    folded, those rejected (with why), and what each volunteer's trust record counts."""

    state: str  # agreed | settled | unsettled | unverified
    fold: str = ""
    replicas: tuple[tuple[str, str], ...] = ()  # (adapter id, why it is not folded)
    rejected: tuple[tuple[str, str], ...] = ()  # (adapter id, reason)
    outcomes: tuple[tuple[str, str, str], ...] = ()  # (volunteer, outcome, detail)


REFUSED_DISAGREED = "disagreed"  # the refusal kind of an adapter its replicas outvoted (or could not settle)


def replica_id(job_id: str) -> str:
    """A new replica run's id: made as every task id of its job is (tasks.new_task_id), so
    that nothing in it tells a volunteer its run checks another's."""
    return new_task_id(job_id)


class Replicas:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._add_run = client.register_script(_ADD_RUN)
        self.trust = Trust(client)

    def sampling_key(self) -> bytes:
        """The secret that picks which tasks are replicated: made by the first coordinator that
        asks (SET NX, so all processes on this ledger agree), the same ever after."""
        self.r.set(keys.SAMPLING_KEY, secrets.token_hex(32), nx=True)
        raw = self.r.get(keys.SAMPLING_KEY)
        return bytes.fromhex(raw.decode() if isinstance(raw, bytes) else raw)

    def get(self, task_id: str) -> ReplicaGroup | None:
        data = decode(self.r.hgetall(keys.replicas(task_id)))
        return replica_group_from_hash(task_id, data) if data else None

    def open_groups(self) -> list[ReplicaGroup]:
        """Every group not yet settled, the oldest first."""
        ids = [t.decode() for t in self.r.zrange(keys.REPLICATED, 0, -1)]
        pipe = self.r.pipeline(transaction=False)
        for task_id in ids:
            pipe.hgetall(keys.replicas(task_id))
        return [replica_group_from_hash(t, decode(d)) for t, d in zip(ids, pipe.execute()) if d]

    def unsettled(self, job_id: str) -> bool:
        """Whether a replicated task of the job is not settled yet (its adapters are held)."""
        return any(g.job == job_id for g in self.open_groups())

    def add_run(self, task_id: str, run_id: str, avoid: Sequence[str]) -> bool:
        """Open one more replica run of an open group (a third, to settle a disagreement)."""
        return bool(self._add_run(keys=[keys.replicas(task_id), keys.task(task_id), keys.task(run_id), keys.PENDING],
                                  args=[task_id, run_id, time.time(), json.dumps(list(avoid))]))

    def settle(self, group: ReplicaGroup, how: Settlement, retire: Sequence[str] = ()) -> bool:
        """End ``group`` as ``how`` says, atomically, retiring its runs ``retire`` that have not
        handed anything in (a late upload of theirs is refused: they are no longer leased).
        False (nothing changed) when the group was settled meanwhile or another result joined it
        since it was read."""
        key = keys.replicas(group.task_id)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.watch(key)
            now = decode(pipe.hgetall(key))
            if now.get("state") != "open" or json.loads(now.get("results") or "{}") != group.results:
                return False
            owners = {a: [v.decode() if v else "" for v in pipe.hmget(keys.adapter(a), "job", "task", "worker")]
                      for a, _ in how.rejected}
            holders = [pipe.hget(keys.adapter(a), "volunteer") for a in group.results.values()]
            pipe.multi()
            for volunteer in holders:  # their contributions are no longer waiting to be checked
                if volunteer:
                    pipe.hincrby(keys.trust(volunteer.decode()), "held", -1)
            if how.fold:
                pipe.hset(keys.adapter(how.fold), "state", AdapterState.BUFFERED.value)
                pipe.rpush(keys.FOLD_BUFFER, how.fold)
            for adapter_id, why in how.replicas:
                pipe.hset(keys.adapter(adapter_id), mapping={"state": AdapterState.REPLICA.value, "reason": why})
            for adapter_id, reason in how.rejected:
                pipe.hset(keys.adapter(adapter_id), mapping={"state": AdapterState.REJECTED.value, "reason": reason})
                job, task, worker = owners[adapter_id]
                if job:
                    pipe.hincrby(keys.job(job), "adapters_rejected", 1)
                    pipe.hincrby(keys.COUNTERS, "adapters:rejected", 1)
                # Counted with the fold gates' refusals (coordinator.ledger.counters), as its own kind.
                Counters(self.r).refuse(Refusal(time.time(), "fold", REFUSED_DISAGREED, reason, task, worker, job), pipe)
            for volunteer, outcome, detail in how.outcomes:
                self.trust.record_in(pipe, volunteer, outcome, detail)
            for run in retire:
                pipe.zrem(keys.PENDING, run)
                pipe.zrem(keys.LEASES, run)
                pipe.hset(keys.task(run), mapping={"state": TaskState.FAILED.value,
                                                   "error": f"not needed: task {group.task_id} was settled without it"})
            pipe.hset(key, mapping={"state": how.state, "settled": time.time(), "folded": how.fold})
            pipe.zrem(keys.REPLICATED, group.task_id)
            try:
                pipe.execute()
            except redis.WatchError:
                return False
        return True
