"""Leaders: one scheduler and one folder at a time, each under a lease in Redis with a fence.

A process that wants to lead a role (``scheduler``, ``folder``) campaigns: if nobody holds the
role's lease it takes it (SET with a TTL) under a new fence from the role's counter (INCR), in one
script; while it leads it renews the lease by a script that first checks the lease is still its
own. A standby campaigns at a shorter period and takes over once the lease has lapsed, so a dead
leader is replaced within one lease lifetime (plus one standby period).

A lease only elects. What protects the ledger is the fence checked at the write: every write a
leader makes (a lease granted, a run placed, a version published) names the leader's token
("<fence>:<holder>") and the script or transaction that writes checks, in the same atomic step,
that the role's lease still holds exactly that token (:data:`FENCED`). A leader that was paused
past its lease (a long GC, a stopped VM, a partition) and wakes up believing it leads is refused
at its first write, whether or not another process has taken the role since: the lease lapsed.

The scripts take the leader key as their last KEYS and the token as their last ARGV, so the
check is a small prefix that composes with whatever else a script does; an empty token checks
nothing (a caller outside the election: tests, version 0, an admin's one-off operation, which
is protected by the version number it publishes under instead).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import redis

from coordinator.ledger import keys

log = logging.getLogger("nomoat.leaders")

# leader_problem(key, mine): "" when ``mine`` is "" or the lease at ``key`` holds exactly ``mine``.
LEADER_CHECK = """
local function leader_problem(key, mine)
  if mine == '' then return '' end
  local held = redis.call('GET', key)
  if held == mine then return '' end
  if not held then return 'the leader lease ' .. key .. ' lapsed; token ' .. mine .. ' no longer leads' end
  return 'the leader lease ' .. key .. ' is held by ' .. held .. ', not ' .. mine
end
"""

# The prefix of every fenced script: refuse (an error reply, nothing written) unless the caller's
# token (last ARGV) still holds the leader lease (last KEYS).
FENCED = LEADER_CHECK + """
do
  local why = leader_problem(KEYS[#KEYS], ARGV[#ARGV])
  if why ~= '' then return redis.error_reply('NOTLEADER ' .. why) end
end
"""

# KEYS: lease, fence counter. ARGV: holder, ttl ms. The token held now ("<fence>:<holder>"), the
# lease taken under a new fence if nobody held it and renewed if this holder did; nil when
# another holds it. A retried call by the same holder gets the same token (no fence is burnt).
_CAMPAIGN = """
local held = redis.call('GET', KEYS[1])
if held then
  if string.sub(held, -#ARGV[1] - 1) == ':' .. ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return held
  end
  return false
end
local token = redis.call('INCR', KEYS[2]) .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
return token
"""

# KEYS: lease. ARGV: token, ttl ms. 1 when the lease was still this token's and is renewed.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""

# KEYS: lease. ARGV: token. Gives the lease up if it is still this token's (a clean shutdown).
_RESIGN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
"""

NOT_LEADER = "NOTLEADER"


class NotLeader(Exception):
    """A leader's write was refused: its lease lapsed or another process leads the role now."""


@dataclass(frozen=True)
class Fence:
    """What a leader's writes carry: its role and token ("<fence>:<holder>")."""

    role: str
    token: str

    @property
    def number(self) -> int:
        return int(self.token.split(":", 1)[0])

    @property
    def key(self) -> str:
        return keys.leader(self.role)


def fence_pair(role: str, fence: Fence | None) -> tuple[str, str]:
    """The (last key, last arg) a fenced script takes: the role's lease key and the caller's token
    ("" when the caller is not a leader and nothing is checked)."""
    if fence is not None and fence.role != role:
        raise ValueError(f"a {fence.role} fence cannot write as the {role}")
    return keys.leader(role), fence.token if fence else ""


T = TypeVar("T")


def fenced(call: Callable[[], T]) -> T:
    """Run a fenced script; its NOTLEADER refusal becomes :class:`NotLeader`."""
    try:
        return call()
    except redis.ResponseError as exc:
        # A script's own reply starts with it; a pipeline's names the command first.
        message = str(exc)
        at = message.find(NOT_LEADER + " ")
        if message.startswith(NOT_LEADER) or at >= 0:
            raise NotLeader(message[max(at, 0) + len(NOT_LEADER):].strip()) from None
        raise


def request_id() -> str:
    """A fresh id for one call of a script that a retry must not repeat: the script remembers it
    with what it wrote, and answers a second run of the same call as it answered the first."""
    return secrets.token_hex(8)


def holder_id() -> str:
    """This process, as a lease names it: host, pid and a random part (a restarted pid differs)."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"


def leader_of(client: redis.Redis, role: str) -> tuple[int, str] | None:
    """(fence, holder) of the process leading ``role`` now, or None when nobody does."""
    raw = client.get(keys.leader(role))
    if raw is None:
        return None
    fence, holder = raw.decode().split(":", 1)
    return int(fence), holder


class Leadership:
    """One process's campaign for one role. :meth:`campaign` is one step (take, renew or wait);
    :meth:`run` repeats it in a thread; :meth:`fence` is what the role's writes carry now (None:
    this process does not lead, or its lease may have lapsed by its own clock)."""

    def __init__(self, client: redis.Redis, role: str, ttl_s: float, holder: str | None = None) -> None:
        if role not in keys.LEADER_ROLES:
            raise ValueError(f"there is no leader role {role!r}; the roles are {', '.join(keys.LEADER_ROLES)}")
        self.r = client
        self.role = role
        self.ttl_s = ttl_s
        self.holder = holder or holder_id()
        self._campaign = client.register_script(_CAMPAIGN)
        self._renew = client.register_script(_RENEW)
        self._resign = client.register_script(_RESIGN)
        self._fence: Fence | None = None
        self._valid_until = 0.0  # monotonic: past it, this process stops believing it leads
        self._lock = threading.Lock()
        self.terms = 0  # how many terms this process has begun (a new term: state to take over)

    @property
    def ttl_ms(self) -> int:
        return max(1, int(self.ttl_s * 1000))

    def fence(self) -> Fence | None:
        with self._lock:
            if self._fence is not None and time.monotonic() < self._valid_until:
                return self._fence
            return None

    def campaign(self) -> Fence | None:
        """One step: renew the lease if this process holds it, take it if nobody does; returns the
        fence held now. Its own deadline is counted from before the call (a slow reply shortens it)."""
        started = time.monotonic()
        with self._lock:
            held = self._fence
        if held is not None:
            renewed = bool(self._renew(keys=[held.key], args=[held.token, self.ttl_ms]))
            token = held.token if renewed else None
        else:
            raw = self._campaign(keys=[keys.leader(self.role), keys.leader_fence(self.role)],
                                 args=[self.holder, self.ttl_ms])
            token = raw.decode() if raw else None
        with self._lock:
            if token is None:
                if self._fence is not None:
                    log.warning("this process no longer leads the %s (its lease %s was lost)", self.role,
                                self._fence.token)
                self._fence = None
                return None
            if self._fence is None or self._fence.token != token:
                self.terms += 1
                log.info("this process leads the %s now (fence %s)", self.role, token.split(":", 1)[0])
            self._fence = Fence(self.role, token)
            # A little short of the TTL: clocks drift, and a reply may arrive late.
            self._valid_until = started + self.ttl_s * 0.9
            return self._fence

    def resign(self) -> None:
        with self._lock:
            held, self._fence = self._fence, None
        if held is not None:
            self._resign(keys=[held.key], args=[held.token])

    def run(self, stopping: threading.Event) -> None:
        """Campaign until ``stopping`` is set: a leader renews every third of its TTL, a standby
        asks every tenth, so it takes over soon after a dead leader's lease lapses."""
        while True:
            try:
                leading = self.campaign() is not None
            except redis.RedisError as exc:  # the ledger is away: leading is not known, so not claimed
                log.warning("cannot reach Redis to campaign for the %s (%s)", self.role, exc)
                with self._lock:
                    self._valid_until = min(self._valid_until, time.monotonic())
                leading = False
            if stopping.wait(self.ttl_s / 3 if leading else self.ttl_s / 10):
                break
        try:
            self.resign()
        except redis.RedisError:
            pass


@dataclass
class Term:
    """The fence a leader's round writes under, shared by the parts that write in that round (the
    scheduler and its outbound dispatcher): set once at the round's start, so a lease lost midway
    makes the remaining writes fail (NotLeader) rather than go out unfenced."""

    fence: Fence | None = None
