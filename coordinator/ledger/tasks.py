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

# add_event(key, event, now, keep): append (now, event) to the task's "events" (a JSON list),
# keeping the newest ``keep``. A worker's notes arrive with its heartbeats (Leases.heartbeat).
EVENT = """
local function add_event(key, event, now, keep)
  local events = cjson.decode(redis.call('HGET', key, 'events') or '[]')
  table.insert(events, {now, event})
  while #events > tonumber(keep) do table.remove(events, 1) end
  redis.call('HSET', key, 'events', cjson.encode(events))
end
"""


def count_states(tasks: Iterable[TaskRecord]) -> dict[str, int]:
    """How many of ``tasks`` are in each state (every state present, zero or more)."""
    counts = {s.value: 0 for s in TaskState}
    for task in tasks:
        counts[task.state.value] += 1
    return counts


_SET_TRAINING = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'batch_size', ARGV[1], 'learning_rate', ARGV[2], 'fold_width', ARGV[3])
end
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
        return count_states(self.of_job(job_id))

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
