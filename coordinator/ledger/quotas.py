"""What each caller holds and has used, counted in Redis so every gateway agrees.

Keyed on the caller's identity id (coordinator.gateway.quotas.owner_of): its open streams (a
sorted set of stream ids by expiry, so a gateway that dies mid-stream frees them within the
expiry), its unfinished jobs with their task counts, and the dataset bytes it submitted today.
Each check-and-take is one script: two gateways cannot both give the last slot. The submit
shares' rules (:func:`check_submit`, :func:`reserve_submit`) turn the script's answers into the
sentence a submitter reads.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import redis

from coordinator.errors import LimitReached
from coordinator.ledger import keys
from coordinator.ledger.records import JobState

if TYPE_CHECKING:
    from coordinator.ledger import Ledger
    from coordinator.settings import Settings

# KEYS[1] streams zset; ARGV: now, limit, stream id, expires at. 1 when opened.
_OPEN = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
redis.call('PEXPIREAT', KEYS[1], math.floor(tonumber(ARGV[4]) * 1000))
return 1
"""

# KEYS[1] jobs zset (job -> tasks), KEYS[2] today's bytes; ARGV: job, tasks, bytes, max jobs,
# max tasks, max bytes, bytes key ttl. Returns {code, held}: 0 taken; 1 jobs, 2 tasks, 3 bytes full.
_RESERVE = """
local jobs = redis.call('ZCARD', KEYS[1])
if jobs >= tonumber(ARGV[4]) then return {1, jobs} end
local tasks = 0
for i, v in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')) do
  if i % 2 == 0 then tasks = tasks + tonumber(v) end
end
if tasks + tonumber(ARGV[2]) > tonumber(ARGV[5]) then return {2, tasks} end
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
if used + tonumber(ARGV[3]) > tonumber(ARGV[6]) then return {3, used} end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('INCRBY', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[7])
return {0, 0}
"""

DAY_S = 24 * 3600


def today(now: float | None = None) -> str:
    return time.strftime("%Y%m%d", time.gmtime(now if now is not None else time.time()))


class Quotas:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._open = client.register_script(_OPEN)
        self._reserve = client.register_script(_RESERVE)

    # -- streams ----------------------------------------------------------------------------

    def open_stream(self, owner: str, stream_id: str, limit: int, ttl_s: float) -> bool:
        """Take one of ``owner``'s ``limit`` stream slots until ``ttl_s`` from now; False if none is free."""
        now = time.time()
        return bool(self._open(keys=[keys.quota_streams(owner)], args=[now, limit, stream_id, now + ttl_s]))

    def refresh_stream(self, owner: str, stream_id: str, ttl_s: float) -> None:
        key = keys.quota_streams(owner)
        pipe = self.r.pipeline(transaction=True)
        pipe.zadd(key, {stream_id: time.time() + ttl_s}, xx=True)
        pipe.expire(key, int(ttl_s) + 1)
        pipe.execute()

    def close_stream(self, owner: str, stream_id: str) -> None:
        self.r.zrem(keys.quota_streams(owner), stream_id)

    def streams(self, owner: str) -> int:
        return int(self.r.zcount(keys.quota_streams(owner), time.time(), "+inf"))

    # -- submits ----------------------------------------------------------------------------

    def submitted_today(self, owner: str) -> int:
        return int(self.r.get(keys.quota_bytes(owner, today())) or 0)

    def unfinished_jobs(self, owner: str) -> dict[str, int]:
        """The owner's jobs counted against it (job -> tasks)."""
        return {j.decode(): int(n) for j, n in self.r.zrange(keys.quota_jobs(owner), 0, -1, withscores=True)}

    def forget_job(self, owner: str, job_id: str) -> None:
        self.r.zrem(keys.quota_jobs(owner), job_id)

    def reserve_submit(self, owner: str, job_id: str, tasks: int, size: int, max_jobs: int, max_tasks: int,
                       max_bytes: int) -> tuple[int, int]:
        """Count a job of ``tasks`` tasks and ``size`` bytes against ``owner``, if it fits.

        (0, 0) when counted; else (1, jobs held), (2, tasks held) or (3, bytes used today): which
        bound it would pass and how much the owner holds of it."""
        code, held = self._reserve(keys=[keys.quota_jobs(owner), keys.quota_bytes(owner, today())],
                                   args=[job_id, tasks, size, max_jobs, max_tasks, max_bytes, 2 * DAY_S])
        return int(code), int(held)

    def release_submit(self, owner: str, job_id: str, size: int) -> None:
        """Undo :meth:`reserve_submit` (the job was not recorded after all)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.zrem(keys.quota_jobs(owner), job_id)
        pipe.decrby(keys.quota_bytes(owner, today()), size)
        pipe.execute()


# -- submit shares (the rules; coordinator.schedule.submit calls them, the gateway names the owner) --


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _unfinished(ledger: Ledger, owner: str) -> dict[str, int]:
    """The owner's jobs still running (job -> tasks); finished ones are forgotten on the way."""
    held = ledger.quotas.unfinished_jobs(owner)
    for job_id in list(held):
        job = ledger.jobs.get(job_id)
        if job is None or job.state != JobState.RUNNING:
            ledger.quotas.forget_job(owner, job_id)
            del held[job_id]
    return held


def check_submit(ledger: Ledger, settings: Settings, owner: str | None, size: int) -> None:
    """Before a dataset's bytes are read: refuse a submit that cannot fit the owner's share."""
    if owner is None:
        return
    used = ledger.quotas.submitted_today(owner)
    if used + size > settings.max_submit_bytes_per_day:
        raise LimitReached(f"this dataset ({_mib(size)}) and what your token submitted today ({_mib(used)}) pass "
                           f"the {_mib(settings.max_submit_bytes_per_day)} one submitter may send a day: "
                           f"submit it tomorrow (UTC) or ask the operator for more")
    jobs = _unfinished(ledger, owner)
    if len(jobs) >= settings.max_jobs_per_submitter:
        raise LimitReached(f"your token has {len(jobs)} jobs running, as many as one submitter may have: "
                           f"wait for one to finish")


def reserve_submit(ledger: Ledger, settings: Settings, owner: str | None, job_id: str, tasks: int,
                   size: int) -> None:
    """Count a new job against its owner's share, atomically with every other gateway's
    submits; LimitReached (a sentence) when it does not fit. Undo with :func:`release_submit`."""
    if owner is None:
        return
    _unfinished(ledger, owner)
    code, held = ledger.quotas.reserve_submit(owner, job_id, tasks, size, settings.max_jobs_per_submitter,
                                              settings.max_pending_tasks_per_submitter,
                                              settings.max_submit_bytes_per_day)
    if code == 1:
        raise LimitReached(f"your token has {held} jobs running, as many as one submitter may have: "
                           f"wait for one to finish")
    if code == 2:
        raise LimitReached(f"this dataset makes {tasks} tasks and your running jobs hold {held}; one submitter may "
                           f"have {settings.max_pending_tasks_per_submitter} pending: wait for a job to finish "
                           f"or submit a smaller dataset")
    if code == 3:
        raise LimitReached(f"this dataset ({_mib(size)}) and what your token submitted today ({_mib(held)}) pass "
                           f"the {_mib(settings.max_submit_bytes_per_day)} one submitter may send a day: "
                           f"submit it tomorrow (UTC) or ask the operator for more")


def release_submit(ledger: Ledger, owner: str | None, job_id: str, size: int) -> None:
    if owner is not None:
        ledger.quotas.release_submit(owner, job_id, size)
