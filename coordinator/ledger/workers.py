"""Workers: the volunteers' machines, who registered them, when they were last heard from, and how
fast their cards train.

The measured speed (tokens per second over every run a worker finished) lives here and only
here: the scheduler sizes runs from it, so a restarted coordinator knows every card's speed.
Which Ray node a worker runs on is recorded with each finished run; a node that names its worker
(the agent labels its Ray node with the worker id) is matched by that name first, so a worker
whose node was replaced keeps its speed.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping

import redis

from coordinator.ledger import keys
from coordinator.ledger.codec import decode, to_fields, worker_from_hash
from coordinator.ledger.pages import Cursor, older
from coordinator.ledger.records import WorkerRecord

# KEYS: worker, NODE_WORKERS. ARGV: tokens, seconds, node id, worker id. Adds a finished run: the worker's speed is its
# total tokens over its total training seconds; it ran on that node. Returns the new speed.
_RUN = """
local tokens = redis.call('HINCRBYFLOAT', KEYS[1], 'tokens_trained', ARGV[1])
local seconds = redis.call('HINCRBYFLOAT', KEYS[1], 'train_seconds', ARGV[2])
local speed = tonumber(tokens) / math.max(tonumber(seconds), 1e-6)
redis.call('HSET', KEYS[1], 'tokens_per_s', tostring(speed))
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'node_id', ARGV[3])
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
end
return tostring(speed)
"""


# KEYS: worker, WORKERS, token's workers, NODE_WORKERS, OUTBOUND_POLLS, inbox, the volunteer's retired
# hash. ARGV: worker id, cutoff, node id. A worker last seen before the cutoff is summarised into its
# volunteer's retired hash and its records removed, in one step (one seen since is left alone: 0).
_RETIRE = """
local seen = redis.call('ZSCORE', KEYS[2], ARGV[1])
if seen and tonumber(seen) >= tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[7], 'workers', 1)
redis.call('HINCRBYFLOAT', KEYS[7], 'tasks_done', redis.call('HGET', KEYS[1], 'tasks_done') or '0')
redis.call('HINCRBYFLOAT', KEYS[7], 'tokens_trained', redis.call('HGET', KEYS[1], 'tokens_trained') or '0')
redis.call('DEL', KEYS[1], KEYS[6])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
if ARGV[3] ~= '' and redis.call('HGET', KEYS[4], ARGV[3]) == ARGV[1] then redis.call('HDEL', KEYS[4], ARGV[3]) end
return 1
"""


class TooManyWorkers(Exception):
    """A token already has as many active workers as it may."""

    def __init__(self, active: int) -> None:
        super().__init__(f"{active} active workers")
        self.active = active


# How long a process keeps the token it read for a worker. A worker's token never changes once
# registered (admit gives another token a new id), so the answer cannot go stale but for a
# removed worker, whose leases and runs the ledger's own checks refuse anyway; and a volunteer
# heartbeats every tens of seconds, so a cache shorter than that would never be hit.
OWNER_CACHE_S = 300.0
_OWNER_CACHE_MAX = 65536


class Workers:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._retire = client.register_script(_RETIRE)
        self._run = client.register_script(_RUN)
        self._owners: dict[str, tuple[float, str]] = {}  # worker id -> (until, its token's hash)

    def token_of(self, worker_id: str) -> str | None:
        """The hash of the token that registered ``worker_id`` ("" for none), None for no such
        worker: the ownership check of every call a worker makes (heartbeat, poll, upload,
        report), so it reads one field, and a known answer is kept for ``OWNER_CACHE_S``."""
        now = time.monotonic()
        cached = self._owners.get(worker_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        raw = self.r.hget(keys.worker(worker_id), "token")
        if raw is None:
            self._owners.pop(worker_id, None)
            return None  # unknown workers are not cached: made-up ids must not grow the cache
        if len(self._owners) >= _OWNER_CACHE_MAX:
            self._owners.clear()
        token = raw.decode()
        self._owners[worker_id] = (now + OWNER_CACHE_S, token)
        return token

    def admit(self, requested_id: str, *, name: str, card: bytes, node_id: str, token: str,
              active_since: float, most: int) -> tuple[str, bool]:
        """Register a worker; returns (its id, whether it rejoined under ``requested_id``).

        A worker keeps the id it asks for only if the same token (its hash) registered it. A new
        one is refused (:class:`TooManyWorkers`) once its token has ``most`` workers seen since
        ``active_since``; two registrations racing may both pass, a bound not a quota.
        """
        known = self.get(requested_id) if requested_id else None
        rejoining = known is not None and known.token == token
        if not rejoining:
            active = self.active_of(token, active_since)
            if active >= most:
                raise TooManyWorkers(active)
        worker_id = requested_id if rejoining else "w-" + secrets.token_hex(4)
        self.register(worker_id, name=name, card=card, node_id=node_id, token=token)
        return worker_id, rejoining

    def register(self, worker_id: str, *, name: str, card: bytes, node_id: str = "", token: str = "") -> None:
        """Record a worker; one registering again keeps its counters, and its measured speed
        unless its card changed."""
        now = time.time()
        key = keys.worker(worker_id)
        # Its kind is fixed here, by how it joined: a Ray node registers with its node id. (The
        # outbound dispatcher later records a node id of its own with each run, so the node id
        # cannot tell them apart.)
        fields = to_fields({"name": name, "card": card, "node_id": node_id, "token": token, "registered": now,
                            "kind": "ray" if node_id else "outbound"})
        known = self.r.hget(key, "card")
        pipe = self.r.pipeline(transaction=True)
        if known is not None and known.decode() != fields["card"]:
            pipe.hdel(key, "tokens_trained", "train_seconds", "tokens_per_s")
        pipe.hset(key, mapping=fields)
        pipe.hsetnx(key, "tasks_done", 0)
        pipe.zadd(keys.WORKERS, {worker_id: now})
        if token:
            pipe.sadd(keys.token_workers(token), worker_id)
        pipe.execute()

    def active_of(self, token: str, since: float) -> int:
        """How many workers ``token`` registered were seen since ``since``: its own workers read
        alone (a registration must not read every worker ever registered; with a thousand
        volunteers joining that was most of the coordinator's time)."""
        ids = [i.decode() for i in self.r.smembers(keys.token_workers(token))]
        if not ids:
            return 0
        seen = self.r.zmscore(keys.WORKERS, ids)
        return sum(1 for s in seen if s is not None and s >= since)

    def of_token(self, token: str) -> list[WorkerRecord]:
        """The workers ``token`` (its hash) registered, read alone (not every worker ever)."""
        ids = sorted(i.decode() for i in self.r.smembers(keys.token_workers(token)))
        seen = self.r.zmscore(keys.WORKERS, ids) if ids else []
        return self.many([(w, s or 0.0) for w, s in zip(ids, seen)])

    def get(self, worker_id: str) -> WorkerRecord | None:
        data = decode(self.r.hgetall(keys.worker(worker_id)))
        if not data:
            return None
        return worker_from_hash(worker_id, data, self.r.zscore(keys.WORKERS, worker_id) or 0.0)

    def cards(self, worker_ids: list[str]) -> list[bytes]:
        """The registered card (a serialized nomoat.v1.Card) of each worker, b"" for none; one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for worker_id in worker_ids:
            pipe.hget(keys.worker(worker_id), "card")
        if not worker_ids:
            return []
        return [bytes.fromhex(raw.decode()) if raw else b"" for raw in pipe.execute()]  # kept as hex (records)

    def many(self, entries: list[tuple[str, float]]) -> list[WorkerRecord]:
        """The workers of (worker id, last seen) ``entries``, in that order (one round trip)."""
        pipe = self.r.pipeline(transaction=False)
        for worker_id, _ in entries:
            pipe.hgetall(keys.worker(worker_id))
        rows = pipe.execute() if entries else []
        return [worker_from_hash(w, decode(d), seen) for (w, seen), d in zip(entries, rows) if d]

    def active(self, since: float) -> list[WorkerRecord]:
        """The workers seen since ``since``, least recently seen first: read through the index
        of when each was last seen, so the workers gone before cost nothing."""
        entries = self.r.zrangebyscore(keys.WORKERS, since, "+inf", withscores=True)
        return self.many([(w.decode(), s) for w, s in entries])

    def gone(self, since: float, limit: int, after: Cursor | None = None) -> tuple[list[WorkerRecord], Cursor | None]:
        """A page of the workers not seen since ``since``, most recently seen first, and the
        cursor of the next page (None: no more)."""
        entries, cursor = older(self.r, keys.WORKERS, limit, after, top=f"({since}")
        return self.many(entries), cursor

    def count(self, since: float = 0.0) -> int:
        """How many workers were seen since ``since`` (every worker ever registered for 0)."""
        return int(self.r.zcount(keys.WORKERS, since or "-inf", "+inf"))

    def all(self) -> list[WorkerRecord]:
        """Every worker ever registered, least recently seen first (grows with history: for
        reports and checks, never a hot path)."""
        entries = self.r.zrange(keys.WORKERS, 0, -1, withscores=True)
        pipe = self.r.pipeline(transaction=False)
        for worker_id, _ in entries:
            pipe.hgetall(keys.worker(worker_id.decode()))
        return [worker_from_hash(wid.decode(), decode(w), seen) for (wid, seen), w in zip(entries, pipe.execute())]

    def record_run(self, worker_id: str, node_id: str, tokens: int, seconds: float) -> float:
        """Add a finished run, on ``node_id``, to the worker's measured tokens per second; returns
        the new figure (0 when there is nothing to measure)."""
        if not worker_id or seconds < 0 or (seconds == 0 and tokens <= 0):
            return 0.0
        return float(self._run(keys=[keys.worker(worker_id), keys.NODE_WORKERS],
                               args=[tokens, seconds, node_id, worker_id]))

    def speeds_by_node(self, claims: Mapping[str, str]) -> dict[str, float]:
        """Ray node id -> the measured tokens/s of its worker (known speeds only).

        ``claims`` maps each node the scheduler sees to the worker it names itself (its Ray label;
        "" for a node with none). A named node takes its worker's speed, even before a run there
        recorded the node (as after a Ray restart gave the card a new node); a node that names
        no worker takes the speed of the worker that last finished a run on it (the node index
        record_run keeps). Two round trips however many workers were ever registered: the
        scheduler asks every round.
        """
        nodes = list(claims)
        workers = dict(zip(nodes, self.r.hmget(keys.NODE_WORKERS, nodes))) if nodes else {}
        owner = {node: claims[node] or (workers[node].decode() if workers.get(node) else "") for node in nodes}
        owner = {node: w for node, w in owner.items() if w}
        pipe = self.r.pipeline(transaction=False)
        for worker_id in owner.values():
            pipe.hget(keys.worker(worker_id), "tokens_per_s")
        speeds: dict[str, float] = {}
        for node, raw in zip(owner, pipe.execute() if owner else []):
            speed = float(raw) if raw else 0.0
            if speed > 0:
                speeds[node] = speed
        return speeds


    def retire(self, worker: WorkerRecord, volunteer: str, cutoff: float) -> bool:
        """Summarise a worker last seen before ``cutoff`` into ``volunteer``'s retired record (its
        tasks and tokens stay counted) and remove its records, atomically; False when it was seen
        since (it came back meanwhile)."""
        return bool(self._retire(keys=[keys.worker(worker.worker_id), keys.WORKERS, keys.token_workers(worker.token or "-"),
                                       keys.NODE_WORKERS, keys.OUTBOUND_POLLS, keys.inbox(worker.worker_id),
                                       keys.volunteer_retired(volunteer)],
                                 args=[worker.worker_id, cutoff, worker.node_id or ""]))

    def retired(self, volunteer: str) -> dict[str, float]:
        """What ``volunteer``'s expired workers had done: workers, tasks_done, tokens_trained."""
        data = decode(self.r.hgetall(keys.volunteer_retired(volunteer)))
        return {k: float(data.get(k, 0) or 0) for k in ("workers", "tasks_done", "tokens_trained")}
