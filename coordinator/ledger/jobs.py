"""Jobs: a submitted dataset and its tasks, running until nothing of it is left to train.

The running jobs are also indexed on their own (``keys.RUNNING_JOBS``), so the loops that look
at them every tick read only those, however many finished jobs the ledger holds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import redis

from coordinator.ledger import keys
from coordinator.ledger.codec import (
    NOISE_FIELDS,
    decode,
    job_from_hash,
    new_job_fields,
    new_task_fields,
    noise_from_hash,
    to_fields,
)
from coordinator.ledger.pages import Cursor, older
from coordinator.ledger.records import JobConfig, JobRecord, JobState, TaskRecord, TaskState
from coordinator.ledger.tasks import JOB_EVENTS
from coordinator.schedule.noise import DECAY, NoiseScale, Sample, unbiased


# KEYS: job, RUNNING_JOBS, COUNTERS. ARGV: job id, its end state, then field/value pairs. The job
# leaves the running index, and the ledger-wide "jobs:<state>" counts it once (metrics read the
# count, not the jobs).
_FINISH = """
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then redis.call('HINCRBY', KEYS[3], 'jobs:' .. ARGV[2], 1) end
"""


# KEYS: job. ARGV: one sample's |G|² and tr(Σ) (coordinator.schedule.noise.unbiased), the decay.
# NoiseScale.add's step, in one atomic step: each estimate's moving average takes the sample in.
_ADD_NOISE = """
local old = redis.call('HMGET', KEYS[1], 'noise_g2', 'noise_trace', 'noise_samples')
local d = tonumber(ARGV[3])
local g2 = string.format('%.17g', d * (tonumber(old[1]) or 0) + (1 - d) * tonumber(ARGV[1]))
local trace = string.format('%.17g', d * (tonumber(old[2]) or 0) + (1 - d) * tonumber(ARGV[2]))
local n = (tonumber(old[3]) or 0) + 1
redis.call('HSET', KEYS[1], 'noise_g2', g2, 'noise_trace', trace, 'noise_samples', n)
return {g2, trace, tostring(n)}
"""


class Jobs:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._finish = client.register_script(_FINISH)
        self._add_noise = client.register_script(_ADD_NOISE)

    def create(self, job: JobRecord, tasks: Sequence[TaskRecord], records_index: str = "") -> None:
        """Record a job and its tasks, all pending in shard order, in one transaction.

        ``records_index``: the blob of its records' line offsets (coordinator.schedule.shards)."""
        now = time.time()
        pipe = self.r.pipeline(transaction=True)
        # Its tasks counted by state from the start (coordinator.ledger.tasks.COUNT keeps them).
        counts = {f"tasks:{s.value}": 0 for s in TaskState} | {f"twins:{s.value}": 0 for s in TaskState}
        counts |= {f"tasks:{TaskState.PENDING.value}": len(tasks), "counted": 1}
        pipe.hset(keys.job(job.job_id), mapping={**new_job_fields(job, now), **counts})
        pipe.hincrby(keys.COUNTERS, f"tasks:{TaskState.PENDING.value}", len(tasks))
        if records_index:
            pipe.hset(keys.job(job.job_id), "records_index", records_index)
        pipe.zadd(keys.JOBS, {job.job_id: now})
        pipe.zadd(keys.RUNNING_JOBS, {job.job_id: now})
        for i, task in enumerate(tasks):
            pipe.hset(keys.task(task.task_id), mapping={**new_task_fields(task), "counted": "task"})
            pipe.rpush(keys.job_tasks(job.job_id), task.task_id)
            pipe.zadd(keys.PENDING, {task.task_id: now + i * 1e-6})
        pipe.execute()

    def records_index(self, job_id: str) -> str:
        """The sha256 of the job's records index blob; "" for a job recorded before there was one."""
        raw = self.r.hget(keys.job(job_id), "records_index")
        return raw.decode() if raw else ""

    def get(self, job_id: str) -> JobRecord | None:
        data = decode(self.r.hgetall(keys.job(job_id)))
        return job_from_hash(job_id, data) if data else None

    def config(self, job_id: str) -> JobConfig | None:
        """The job's LoRA and training config alone (what an upload is checked against), None
        for no such job."""
        raw = self.r.hget(keys.job(job_id), "config")
        return JobConfig.from_dict(json.loads(raw)) if raw else None

    def ids(self) -> list[str]:
        """Every job, oldest first."""
        return [j.decode() for j in self.r.zrange(keys.JOBS, 0, -1)]

    def running_ids(self) -> list[str]:
        """The jobs still running, oldest first: what the scheduler and folder loops look at each
        tick, however many finished jobs the ledger holds."""
        return [j.decode() for j in self.r.zrange(keys.RUNNING_JOBS, 0, -1)]

    def finished(self, limit: int, after: Cursor | None = None) -> tuple[list[str], Cursor | None]:
        """A page of the jobs no longer running, newest first, and the cursor of the next (None:
        no more); the running ones, however many jobs finished before, are skipped unread."""
        ids, cursor = older(self.r, keys.JOBS, limit, after, skip=set(self.running_ids()))
        return [i for i, _ in ids], cursor

    def events(self, job_id: str, limit: int = JOB_EVENTS) -> list[tuple[float, str]]:
        """The newest notes of the job's task runs ("task: note"), oldest first."""
        return [tuple(json.loads(raw)) for raw in reversed(self.r.lrange(keys.job_events(job_id), 0, limit - 1))]

    def training(self, job_id: str) -> tuple[int, float, int] | None:
        """(batch size, learning rate, fold width) its newest leased unit trains at; None before any."""
        batch, lr, width = self.r.hmget(keys.job(job_id), "training_batch", "training_lr", "training_width")
        return None if batch is None else (int(batch), float(lr), int(width or 0))

    def index_running(self) -> int:
        """Rebuild the running-jobs index from the job records (a ledger written before it
        existed); how many jobs it lists."""
        jobs = self.r.zrange(keys.JOBS, 0, -1, withscores=True)
        pipe = self.r.pipeline(transaction=False)
        for job_id, _ in jobs:
            pipe.hget(keys.job(job_id.decode()), "state")
        states = pipe.execute()
        running = {job_id: created for (job_id, created), state in zip(jobs, states)
                   if state == JobState.RUNNING.value.encode()}
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(keys.RUNNING_JOBS)
        if running:
            pipe.zadd(keys.RUNNING_JOBS, running)
        pipe.execute()
        return len(running)

    def finish(self, job_id: str, state: JobState, error: str = "") -> None:
        """End a job (done, or failed with ``error``); it leaves the running index with it."""
        if state is JobState.RUNNING:
            raise ValueError("a job is finished as done or failed, not running")
        fields = to_fields({"state": state, "error": error or None, "finished": time.time()})
        self._finish(keys=[keys.job(job_id), keys.RUNNING_JOBS, keys.COUNTERS],
                     args=[job_id, state.value, *(x for kv in fields.items() for x in kv)])

    def sweep(self, job_id: str, summary: dict, records: str, n_records: int, adapters: list[str] = ()) -> int:
        """Retire a finished job's per-task records (coordinator.model.retention): its tasks'
        counts by state (and its ``adapters``' by state) go into the job's ``summary``, its records
        blob is now ``records`` (its validation slice, ``n_records`` long), and its task hashes,
        task list, replica groups, events, adapter-bytes index and the records of ``adapters``
        go, in one transaction; how many keys were removed."""
        task_ids = [t.decode() for t in self.r.lrange(keys.job_tasks(job_id), 0, -1)]
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(keys.job(job_id), mapping={"summary": json.dumps(summary), "records": records,
                                             "n_records": n_records, "swept": time.time()})
        for task_id in task_ids:
            pipe.delete(keys.task(task_id), keys.replicas(task_id))
            pipe.zrem(keys.PENDING, task_id)
            pipe.zrem(keys.LEASES, task_id)
            pipe.zrem(keys.REPLICATED, task_id)
        for adapter_id in adapters:
            pipe.delete(keys.adapter(adapter_id))
        pipe.delete(keys.job_tasks(job_id), keys.job_events(job_id), keys.job_adapter_bytes(job_id))
        pipe.execute()
        return len(task_ids) + len(adapters) + 1

    def expire_adapters(self, job_id: str, states: dict[str, int], adapters: list[str]) -> int:
        """A retired job's adapter records left behind (retired before its adapters were): their
        counts by state added to its summary, the records removed; how many."""
        if not adapters:
            return 0
        with self.r.pipeline(transaction=True) as pipe:  # the summary read, added to and written at once
            while True:
                try:
                    pipe.watch(keys.job(job_id))
                    raw = pipe.hget(keys.job(job_id), "summary")
                    summary = json.loads(raw) if raw else {}
                    counted = summary.setdefault("adapters", {})
                    for state, n in states.items():
                        counted[state] = counted.get(state, 0) + n
                    pipe.multi()
                    pipe.hset(keys.job(job_id), "summary", json.dumps(summary))
                    pipe.delete(*(keys.adapter(a) for a in adapters))
                    pipe.execute()
                    return len(adapters)
                except redis.WatchError:
                    continue

    def forget(self, job_id: str) -> int:
        """Remove a retired job's own record at the end of its retention (its versions keep its
        name and dataset's sha256 in their model cards); how many keys were removed."""
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(keys.job(job_id), keys.job_tasks(job_id), keys.job_events(job_id), keys.job_adapter_bytes(job_id))
        pipe.zrem(keys.JOBS, job_id)
        pipe.zrem(keys.RUNNING_JOBS, job_id)
        return int(pipe.execute()[0])

    def summary(self, job_id: str) -> dict:
        """What :meth:`sweep` kept of a retired job's tasks ({} for a job not retired)."""
        raw = self.r.hget(keys.job(job_id), "summary")
        return json.loads(raw) if raw else {}

    def swept(self, job_id: str) -> bool:
        """Whether the sweeper already retired the job's task records."""
        return bool(self.r.hexists(keys.job(job_id), "swept"))

    def set_warning(self, job_id: str, warning: str) -> None:
        """Why the job's tasks wait (no card fits them), "" when nothing holds it up."""
        self.r.hset(keys.job(job_id), "warning", warning)

    def noise(self, job_id: str) -> NoiseScale:
        """The job's gradient noise scale estimate (empty before any measurement)."""
        return noise_from_hash(decode(dict(zip(NOISE_FIELDS, self.r.hmget(keys.job(job_id), *NOISE_FIELDS)))))

    def add_noise(self, job_id: str, sample: Sample) -> NoiseScale:
        """Fold one accepted adapter's gradient measurement into the job's noise scale estimate
        (:meth:`NoiseScale.add`, as one script: uploads land at once, and the job's hash changes
        with every task's state, so a WATCH would mostly retry); the new estimate."""
        if not sample.usable():
            return self.noise(job_id)
        g2, trace = unbiased(sample)
        raw = self._add_noise(keys=[keys.job(job_id)], args=[repr(g2), repr(trace), repr(DECAY)])
        return noise_from_hash(decode(dict(zip(NOISE_FIELDS, raw))))

    def set_base(self, job_id: str, loss: float, version: int) -> None:
        """The held-out loss of the version the job starts from, for comparison."""
        self.r.hset(keys.job(job_id), mapping=to_fields({"base_loss": loss, "base_version": version}))

    def set_idle(self, job_ids: set[str], ttl_s: float) -> None:
        """The scheduler's word to the folder (another process, perhaps): these running jobs have
        nothing left to train, so their last adapters should be folded now. Lapses after ``ttl_s``
        unless said again, so a scheduler that died does not keep the folder folding early."""
        self.r.set(keys.IDLE_JOBS, json.dumps(sorted(job_ids)), px=max(1, int(ttl_s * 1000)))

    def idle(self) -> set[str]:
        raw = self.r.get(keys.IDLE_JOBS)
        return set(json.loads(raw)) if raw else set()
