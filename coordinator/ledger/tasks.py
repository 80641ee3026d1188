"""Tasks: the units of a job (a shard of its records each), read as TaskRecords.

Tasks are created with their job (coordinator.ledger.jobs) and change state through their
leases (coordinator.ledger.leases) and accepted uploads (coordinator.ledger.adapters).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable

import redis

from coordinator.ledger import keys
from coordinator.ledger.codec import decode, task_from_hash
from coordinator.ledger.records import TaskRecord, TaskState

# count(key, to): the task at ``key`` moves to state ``to`` ("" for: it is deleted): its job's
# "tasks:<state>" counts move with it (a twin's "twins:<state>"), and the ledger-wide
# "tasks:<state>" in COUNTERS for a job's own task. Called by every script that changes a task's
# state, before it writes the state, so the counts are kept in the same atomic step as the states
# and nothing has to read a job's tasks to count them. A hash without "counted" (a replica run; a
# task from before the counts, until Tasks.recount) is not counted.
COUNT = f"""
local function count(key, to)
  local t = redis.call('HMGET', key, 'counted', 'state', 'job')
  if not t[1] or t[2] == to then return end
  local job = '{keys.job("")}' .. (t[3] or '')
  local global = t[1] == 'task'
  if t[2] then
    redis.call('HINCRBY', job, t[1] .. 's:' .. t[2], -1)
    if global then redis.call('HINCRBY', '{keys.COUNTERS}', 'tasks:' .. t[2], -1) end
  end
  if to ~= '' then
    redis.call('HINCRBY', job, t[1] .. 's:' .. to, 1)
    if global then redis.call('HINCRBY', '{keys.COUNTERS}', 'tasks:' .. to, 1) end
  end
end
"""

# add_event(key, event, now, keep): append (now, event) to the task's "events" (a JSON list),
# keeping the newest ``keep``. A worker's notes arrive with its heartbeats (Leases.heartbeat).
JOB_EVENTS = 20  # the newest notes of a job's task runs kept for its status
_JOB_EVENTS_KEY = keys.job_events("\0").split("\0")  # (before, after) the job id
EVENT = f"""
local function add_event(key, event, now, keep)
  local events = cjson.decode(redis.call('HGET', key, 'events') or '[]')
  table.insert(events, {{now, event}})
  while #events > tonumber(keep) do table.remove(events, 1) end
  redis.call('HSET', key, 'events', cjson.encode(events))
  -- the job's newest notes too, so that its status reads them without reading its tasks
  local job = redis.call('HGET', key, 'job')
  if job then
    local events_key = '{_JOB_EVENTS_KEY[0]}' .. job .. '{_JOB_EVENTS_KEY[1]}'
    redis.call('LPUSH', events_key, cjson.encode({{tonumber(now), (redis.call('HGET', key, 'task_id') or '') .. ': ' .. event}}))
    redis.call('LTRIM', events_key, 0, {JOB_EVENTS - 1})
  end
end
"""


def count_states(tasks: Iterable[TaskRecord]) -> dict[str, int]:
    """How many of ``tasks`` are in each state (every state present, zero or more)."""
    counts = {s.value: 0 for s in TaskState}
    for task in tasks:
        counts[task.state.value] += 1
    return counts


# The job keeps its newest unit's training too ("training_*"), for its status to read alone.
_SET_TRAINING = f"""
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'batch_size', ARGV[1], 'learning_rate', ARGV[2], 'fold_width', ARGV[3])
  local job = '{keys.job("")}' .. (redis.call('HGET', KEYS[1], 'job') or '')
  if redis.call('EXISTS', job) == 1 then
    redis.call('HSET', job, 'training_batch', ARGV[1], 'training_lr', ARGV[2], 'training_width', ARGV[3])
  end
end
"""

# Count a job's tasks from their states, once (a job recorded before the counts): KEYS: the job,
# its task list. ARGV: the task key prefix. Marks each task (and its twin) counted and sets the
# job's "tasks:<state>" and "twins:<state>"; nothing when the job is counted already. Returns 1
# when it counted.
_RECOUNT = f"""
if redis.call('HGET', KEYS[1], 'counted') == '1' then return 0 end
local counts = {{}}
local function add(key, kind)
  local t = redis.call('HMGET', key, 'state')
  if not t[1] then return end
  redis.call('HSET', key, 'counted', kind)
  local name = kind .. 's:' .. t[1]
  counts[name] = (counts[name] or 0) + 1
  if kind == 'task' then redis.call('HINCRBY', '{keys.COUNTERS}', 'tasks:' .. t[1], 1) end
end
for _, id in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  add(ARGV[1] .. id, 'task')
  local twin = redis.call('HGET', ARGV[1] .. id, 'twin')
  if twin then add(ARGV[1] .. twin, 'twin') end
end
for _, kind in ipairs({{'tasks', 'twins'}}) do
  for _, state in ipairs({{'pending', 'leased', 'done', 'failed'}}) do
    redis.call('HSET', KEYS[1], kind .. ':' .. state, counts[kind .. ':' .. state] or 0)
  end
end
redis.call('HSET', KEYS[1], 'counted', '1')
return 1
"""


# KEYS: task. ARGV: card, VRAM it needs there. Raises that card's floor (never lowers it), on a task
# that exists.
_FLOOR = """
if redis.call('EXISTS', KEYS[1]) == 0 then return end
local floors = cjson.decode(redis.call('HGET', KEYS[1], 'vram_floors') or '{}')
if not floors[ARGV[1]] or tonumber(floors[ARGV[1]]) < tonumber(ARGV[2]) then floors[ARGV[1]] = tonumber(ARGV[2]) end
redis.call('HSET', KEYS[1], 'vram_floors', cjson.encode(floors))
"""


def new_task_id(job_id: str) -> str:
    """A task id of ``job_id``: the job's id and 32 random bits. Every task and every replica
    run gets one this way, so an id tells a volunteer neither a task's place nor that a run is
    a check of another's."""
    return f"{job_id}-t{secrets.token_hex(4)}"


class Tasks:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._set_training = client.register_script(_SET_TRAINING)
        self._floor = client.register_script(_FLOOR)
        self._recount = client.register_script(_RECOUNT)

    def get(self, task_id: str) -> TaskRecord | None:
        data = decode(self.r.hgetall(keys.task(task_id)))
        return task_from_hash(data) if data else None

    def ids(self, job_id: str) -> list[str]:
        """The job's task ids in shard order."""
        return [t.decode() for t in self.r.lrange(keys.job_tasks(job_id), 0, -1)]

    def many(self, task_ids: Iterable[str]) -> list[TaskRecord]:
        """The tasks named, in that order (one round trip); a task that is gone is left out."""
        pipe = self.r.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hgetall(keys.task(task_id))
        return [task_from_hash(d) for d in (decode(raw) for raw in pipe.execute()) if d]

    def of_job(self, job_id: str) -> list[TaskRecord]:
        return self.many(self.ids(job_id))

    def counts(self, job_id: str) -> dict[str, int]:
        """How many of the job's tasks are in each state: its counters, one read however many
        tasks it has (kept by the scripts that change the states: :data:`COUNT`)."""
        return self.counts_of([job_id])[0]

    def counts_of(self, job_ids: list[str]) -> list[dict[str, int]]:
        """:meth:`counts` of each job, in one round trip (a job never counted is counted first)."""
        names = [f"tasks:{s.value}" for s in TaskState] + ["counted"]
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(keys.job(job_id), *names)
        rows = pipe.execute() if job_ids else []
        out = []
        for job_id, row in zip(job_ids, rows):
            if row[-1] is None and self.recount(job_id):
                row = self.r.hmget(keys.job(job_id), *names)
            out.append({s.value: max(0, int(v or 0)) for s, v in zip(TaskState, row)})
        return out

    def twins_running(self, job_id: str) -> int:
        """How many speculative twins of the job's tasks hold a lease now."""
        return int(self.r.hget(keys.job(job_id), "twins:leased") or 0)

    def recount(self, job_id: str) -> bool:
        """Count the job's tasks from their states (a ledger from before the counts); False when
        it is counted already or there is no such job."""
        if not self.r.exists(keys.job(job_id)):
            return False
        return bool(self._recount(keys=[keys.job(job_id), keys.job_tasks(job_id)], args=[keys.task("")]))

    def set_training(self, runs: Iterable[tuple[str, int, float, int]]) -> None:
        """Record (task id, batch size, learning rate, fold width K) of each leased unit: what its
        run trains at, and how many adapters' fold its batch was divided for."""
        pipe = self.r.pipeline(transaction=False)
        for task_id, batch_size, learning_rate, fold_width in runs:
            # Only onto a task that still exists (a job removed meanwhile leaves no stray hash).
            self._set_training(keys=[keys.task(task_id)], args=[batch_size, repr(learning_rate), fold_width],
                               client=pipe)
        pipe.execute()

    def require_vram(self, task_id: str, card: str, gb: float) -> None:
        """The task ran out of memory on ``card`` (a worker id, or a node id): it needs ``gb`` there,
        so that card is not given it again; other cards are not concerned."""
        self._floor(keys=[keys.task(task_id)], args=[card, gb])
