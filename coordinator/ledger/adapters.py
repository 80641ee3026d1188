"""Adapters: an upload is accepted at most once per (task, fence, sha256), then waits in the fold
buffer until a version folds it (coordinator.ledger.versions) or the gates reject it.

The adapter id is derived from (task, fence, sha256), so a retried upload finds its own earlier
acceptance and is told so. Acceptance marks the task done, holding the current lease or not at
all (:data:`coordinator.ledger.leases.CURRENT_LEASE`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace

import redis

from coordinator.ledger import keys
from coordinator.ledger.connect import Durability
from coordinator.ledger.codec import adapter_from_hash, decode, to_fields
from coordinator.ledger.counters import Counters, Refusal
from coordinator.ledger.leases import CURRENT_LEASE, Claim, claim_args
from coordinator.ledger.leaders import Fence, NotLeader
from coordinator.ledger.tasks import COUNT
from coordinator.ledger.records import AdapterRecord, AdapterState, Check
from coordinator.ledger.replicas import HOLD_RESULT, Hold
from coordinator.ledger.trust import Trust
from coordinator.schedule.noise import Sample

# acceptable(key, task id, fence, adapter id, claim): nil when an upload under (task, fence) may be
# accepted, else the answer {status, detail}: a retry of the accepted upload is a duplicate. A
# claim (leases.claim_at) that is not the lease's holder's is told only that it holds no such lease.
_ACCEPTABLE = CURRENT_LEASE + """
local function acceptable(key, task_id, fence, adapter_id, claim)
  if claim then
    local problem = lease_problem(key, task_id, fence, claim)
    if problem == claim[3] then return {'refused', problem} end
  end
  local t = redis.call('HMGET', key, 'state', 'adapter')
  if t[1] == 'done' then
    if t[2] == adapter_id then return {'duplicate', adapter_id} end
    return {'refused', 'the task is already done: a result from another lease was accepted'}
  end
  local problem = lease_problem(key, task_id, fence)
  if problem ~= '' then return {'refused', problem} end
  return nil
end
"""

# copy_of(task key, the job's adapter-bytes key, sha256, task id): the task whose adapter these
# bytes already are (the job was handed them first for another task), nil when they are this task's
# own. A replica or a speculative twin hands in the bytes of the task it repeats: that task is its own.
# The answer for a copy is {'refused', sentence, 'copy'} (the third: its kind, Accepted.check COPY).
_COPY = """
local function own_task(key, task_id)
  for _, field in ipairs({'replica_of', 'twin_of'}) do
    local v = redis.call('HGET', key, field)
    if v and v ~= '' then return v end
  end
  return task_id
end
local function copy_of(key, bytes_key, sha256, task_id)
  local first = redis.call('HGET', bytes_key, sha256)
  if first and first ~= own_task(key, task_id) then
    return {'refused', 'these bytes are, byte for byte, the adapter of another task of this job, already '
            .. 'handed in: a copy is refused; hand in what you trained on your own shard', 'copy'}
  end
  return nil
end
"""

# KEYS: task, the job's adapter bytes. ARGV: task id, fence, adapter id, sha256, then the claim
# (leases.claim_args). {"", ""} when the upload may proceed: a copy is refused before any byte.
_PRECHECK = _ACCEPTABLE + _COPY + """
return acceptable(KEYS[1], ARGV[1], ARGV[2], ARGV[3], claim_at(5, ARGV[1], ARGV[2]))
       or copy_of(KEYS[1], KEYS[2], ARGV[4], ARGV[1]) or {'', ''}
"""

# KEYS: task, LEASES, adapter, FOLD_BUFFER, worker, (unused), PENDING, then for a replicated task
# its replica group, the run to open, REPLICATED, the task it repeats and the volunteer's trust
# record (see replicas.py), then the job's adapter bytes (sha256 -> the task first handed them in).
# ARGV: task id, fence, adapter id, now, the task key prefix (the partner is found in the script),
# replicated task id ("" for none), run to open
# ("" for none), the volunteers that run avoids (JSON), base version, the volunteer, sha256, then
# field/value pairs for the adapter hash. A copy of another task's adapter is refused (copy_of);
# any other accepted adapter's bytes are claimed for its task in the same step. Returns {status, adapter id or reason}. The partner is the task's speculative
# twin (or the twin's original, see Leases.speculate): the first accepted result marks both done,
# so the other run's upload is refused. A run of a replicated task is held, not buffered, until
# its replicas settle (coordinator.schedule.replication).
_ACCEPT = _ACCEPTABLE + _COPY + HOLD_RESULT + COUNT + """
local answer = acceptable(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) or copy_of(KEYS[1], KEYS[13], ARGV[11], ARGV[1])
if answer then return answer end
redis.call('HSETNX', KEYS[13], ARGV[11], own_task(KEYS[1], ARGV[1]))
-- The partner is read here, in the same step as the acceptance: read before the script, a twin
-- created in between was missed, left leased, and its upload accepted too (the shard twice).
local partner = redis.call('HGET', KEYS[1], 'twin') or redis.call('HGET', KEYS[1], 'twin_of')
count(KEYS[1], 'done')
redis.call('HSET', KEYS[1], 'state', 'done', 'adapter', ARGV[3], 'finished', ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[1])
if partner and redis.call('HGET', ARGV[5] .. partner, 'state') ~= 'done' then
  count(ARGV[5] .. partner, 'done')
  redis.call('HSET', ARGV[5] .. partner, 'state', 'done', 'adapter', ARGV[3], 'finished', ARGV[4])
  redis.call('ZREM', KEYS[2], partner)
  redis.call('ZREM', KEYS[7], partner)
end
for i = 12, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
if ARGV[6] == '' then
  redis.call('HSET', KEYS[3], 'state', 'buffered', 'accepted', ARGV[4])
  redis.call('RPUSH', KEYS[4], ARGV[3])
else
  redis.call('HSET', KEYS[3], 'state', 'held', 'accepted', ARGV[4])
  hold_result(KEYS[8], KEYS[11], KEYS[9], KEYS[10], KEYS[7], ARGV[6], ARGV[1], ARGV[3], ARGV[4], ARGV[7],
              ARGV[8], ARGV[9])
  if ARGV[10] ~= '' then redis.call('HINCRBY', KEYS[12], 'held', 1) end
end
if redis.call('EXISTS', KEYS[5]) == 1 then redis.call('HINCRBY', KEYS[5], 'tasks_done', 1) end
return {'accepted', ARGV[3]}
"""


REFUSED_LEASE = "lease"  # the kind of a refusal the ledger decides: (task, fence) does not hold the lease
REFUSED_COPY = "copy"  # the other: the bytes are another task's adapter of the same job, already handed in


@dataclass(frozen=True)
class Accepted:
    status: str  # accepted | duplicate | refused
    detail: str  # the adapter id, or the reason for a refusal
    kind: str = ""  # a refusal's short code, for counting (coordinator.collect.accept's REFUSED_*)
    check: Check | None = None  # the check a refused adapter failed (None: refused for another reason)
    held: bool = False  # accepted, but held in its task's replica group (not in the fold buffer yet)

    @property
    def ok(self) -> bool:
        return self.status in ("accepted", "duplicate")


def adapter_id_for(task_id: str, fence: int, sha256: str) -> str:
    """Deterministic, so a retried upload of the same result maps onto the same adapter."""
    return hashlib.sha256(f"{task_id}/{fence}/{sha256}".encode()).hexdigest()[:20]


class Adapters:
    def __init__(self, client: redis.Redis, durability: Durability = Durability()) -> None:
        self.r = client
        self.durability = durability
        self._precheck = client.register_script(_PRECHECK)
        self._accept = client.register_script(_ACCEPT)
        self.trust = Trust(client)

    def precheck(self, task_id: str, fence: int, sha256: str, claim: Claim | None = None) -> Accepted | None:
        """None when an upload under (task, fence) would be taken now from the holder of
        ``claim`` (None: checks no holder), else the answer it gets.

        For before any bytes are stored; :meth:`accept` decides again, atomically, whether the
        fence still holds the lease (a fence is granted once: the claim checked here stays its).
        """
        raw = self.r.hget(keys.task(task_id), "job")  # a task's job never changes
        answer = self._precheck(keys=[keys.task(task_id), keys.job_adapter_bytes(raw.decode() if raw else "-")],
                                args=[task_id, fence, adapter_id_for(task_id, fence, sha256), sha256,
                                      *claim_args(claim)])
        return _answer(*answer) if answer[0] else None

    def accept(self, task_id: str, fence: int, sha256: str, *, worker_id: str = "", base_version: int = 0,
               rank: int = 0, alpha: float = 0.0, tokens: int = 0, train_loss: float = 0.0,
               size: int = 0, volunteer: str = "", hold: Hold | None = None,
               gradients: Sample | None = None) -> Accepted:
        """Accept an uploaded adapter if (task, fence) holds the lease: the task is done and the
        adapter waits in the fold buffer, credited to ``worker_id`` (and its trust to
        ``volunteer``) when one is named. With ``hold`` it is a run of a replicated task: it is
        held in the task's replica group instead, which opens ``hold.open`` if that is named."""
        adapter_id = adapter_id_for(task_id, fence, sha256)
        raw = self.r.hget(keys.task(task_id), "job")  # a task's job never changes
        job = raw.decode() if raw else ""
        if not job:
            return Accepted("refused", f"there is no task {task_id!r}", REFUSED_LEASE)
        fields = to_fields({"base_version": base_version, "rank": rank, "alpha": alpha, "tokens": tokens,
                            "train_loss": train_loss, "size": size, "task": task_id, "fence": fence,
                            "sha256": sha256, "job": job, "worker": worker_id, "volunteer": volunteer,
                            **_gradient_fields(gradients)})
        hold = hold or Hold("")
        answer = _answer(*self._accept(
            keys=[keys.task(task_id), keys.LEASES, keys.adapter(adapter_id), keys.FOLD_BUFFER,
                  keys.worker(worker_id or "-"), keys.task("-"), keys.PENDING,
                  keys.replicas(hold.task or "-"), keys.task(hold.open or "-"), keys.REPLICATED,
                  keys.task(hold.task or "-"), keys.trust(volunteer or "-"), keys.job_adapter_bytes(job)],
            args=[task_id, fence, adapter_id, time.time(), keys.task(""), hold.task, hold.open, json.dumps(list(hold.avoid)),
                  base_version, volunteer, sha256, *(x for kv in fields.items() for x in kv)],
        ))
        if answer.ok:  # (a retry after NotDurable finds a duplicate: it is confirmed in turn)
            self.durability.confirm(self.r, f"the adapter of task {task_id} (fence {fence})")
        return replace(answer, held=True) if hold.task and answer.status == "accepted" else answer

    def many(self, adapter_ids: list[str]) -> list[AdapterRecord]:
        """The adapters of ``adapter_ids`` that exist, in that order (one round trip)."""
        pipe = self.r.pipeline(transaction=False)
        for adapter_id in adapter_ids:
            pipe.hgetall(keys.adapter(adapter_id))
        return [adapter_from_hash(i, d) for i, d in zip(adapter_ids, map(decode, pipe.execute())) if d]

    def get(self, adapter_id: str) -> AdapterRecord | None:
        data = decode(self.r.hgetall(keys.adapter(adapter_id)))
        return adapter_from_hash(adapter_id, data) if data else None

    def ids(self) -> list[str]:
        """Every adapter ever accepted (a scan: for checks and reports, not for hot paths)."""
        prefix = keys.adapter("")
        return [k.decode()[len(prefix):] for k in self.r.scan_iter(match=keys.adapter("*"), count=1000)]

    def buffered(self) -> list[AdapterRecord]:
        """Adapters accepted and waiting to be folded, oldest first."""
        ids = [a.decode() for a in self.r.lrange(keys.FOLD_BUFFER, 0, -1)]
        pipe = self.r.pipeline(transaction=False)
        for adapter_id in ids:
            pipe.hgetall(keys.adapter(adapter_id))
        return [adapter_from_hash(i, decode(a)) for i, a in zip(ids, pipe.execute())]

    def buffer_ids(self) -> list[str]:
        """The fold buffer as it stands, duplicates and all (for checks)."""
        return [a.decode() for a in self.r.lrange(keys.FOLD_BUFFER, 0, -1)]

    def reject(self, adapter_id: str, reason: str, check: Check | None = None, leader: Fence | None = None,
               kind: str = "gate") -> bool:
        """Take an adapter out of the buffer for good, with the reason; its job counts it, the
        refusal is counted (as ``kind``) and kept among the recent ones (coordinator.ledger.counters),
        and the trust record of its volunteer counts ``check`` (the check it failed) when one is named.

        Only a buffered adapter is rejected (False otherwise: another folder folded or rejected it
        meanwhile), and with ``leader`` (the folder's fence) only while that fence leads (NotLeader)."""
        key = keys.adapter(adapter_id)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.watch(key, *([leader.key] if leader else []))
            if leader is not None and (pipe.get(leader.key) or b"").decode() != leader.token:
                raise NotLeader(f"adapter {adapter_id} was not rejected: fence {leader.token} no longer leads the folder")
            job, task, worker, volunteer, state = (v.decode() if v else "" for v in
                                                   pipe.hmget(key, "job", "task", "worker", "volunteer", "state"))
            if state != AdapterState.BUFFERED.value:
                return False
            pipe.multi()
            pipe.lrem(keys.FOLD_BUFFER, 0, adapter_id)
            pipe.hset(key, mapping={"state": AdapterState.REJECTED.value, "reason": reason})
            if job:
                pipe.hincrby(keys.job(job), "adapters_rejected", 1)
                pipe.hincrby(keys.COUNTERS, "adapters:rejected", 1)  # every job's, for metrics to read alone
            if volunteer and check is not None:
                self.trust.record_in(pipe, volunteer, check.value, reason)
            Counters(self.r).refuse(Refusal(time.time(), "fold", kind, reason, task, worker, job), pipe)
            try:
                pipe.execute()
            except redis.WatchError:
                return False
        return True

    def expire(self, adapter_ids: list[str]) -> int:
        """Remove the records of refused adapters past their retention (coordinator.model.retention)."""
        return int(self.r.delete(*(keys.adapter(a) for a in adapter_ids))) if adapter_ids else 0

    def first_task_with(self, job_id: str, sha256: str, task_id: str) -> str:
        """The task whose adapter with these bytes the job saw first: ``task_id`` itself the
        first time (the claim is one atomic step), another task's id when this is a copy."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hsetnx(keys.job_adapter_bytes(job_id), sha256, task_id)
        pipe.hget(keys.job_adapter_bytes(job_id), sha256)
        return pipe.execute()[1].decode()

    def mark_unmerged(self, adapter_id: str, version: int) -> None:
        """A folded adapter that ``version`` took out of the model again."""
        with self.r.pipeline(transaction=True) as pipe:  # an expired record is not made again as a stub
            try:
                pipe.watch(keys.adapter(adapter_id))
                if not pipe.exists(keys.adapter(adapter_id)):
                    return
                pipe.multi()
                pipe.hset(keys.adapter(adapter_id), mapping={"state": AdapterState.UNMERGED.value, "unmerged_in": version})
                pipe.execute()
            except redis.WatchError:  # expired meanwhile: its unmerge version says it all
                return

    def recent_norms(self, limit: int = 64) -> list[float]:
        """‖ΔW‖ of the most recently folded adapters, newest first (the norm gate's reference)."""
        return [float(x) for x in self.r.lrange(keys.RECENT_NORMS, 0, limit - 1)]


def _gradient_fields(sample: Sample | None) -> dict[str, float]:
    if sample is None:
        return {}
    return {"grad_micro_sq": sample.micro_sq, "grad_batch_sq": sample.batch_sq,
            "grad_micro_batch": sample.micro_batch, "grad_batch_size": sample.batch_size}


def _answer(status: bytes, detail: bytes, kind: bytes = b"") -> Accepted:
    """The scripts' answer; what they refuse, they refuse for the lease, or (kind "copy") as a copy
    of another task's adapter, a failed check that counts against its volunteer."""
    status_text, kind_text = status.decode(), kind.decode()
    if kind_text == REFUSED_COPY:
        return Accepted(status_text, detail.decode(), REFUSED_COPY, Check.COPY)
    return Accepted(status_text, detail.decode(), REFUSED_LEASE if status_text == "refused" else "")
