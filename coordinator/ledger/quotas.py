"""What each caller holds and has used, counted in Redis so every gateway agrees.

Keyed on the caller's identity id (coordinator.gateway.quotas.owner_of): its open streams (a
sorted set of stream ids by expiry, so a gateway that dies mid-stream frees them within the
expiry), its unfinished jobs with their task counts, and the dataset bytes it submitted today.
Each check-and-take is one script: two gateways cannot both give the last slot.
"""

from __future__ import annotations

import time

import redis

from coordinator.ledger import keys

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
