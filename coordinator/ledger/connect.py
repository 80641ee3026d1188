"""Connecting to the ledger's Redis: a plain URL, or Sentinel's, and what a failover asks of writes.

``--redis-url`` takes ``redis://``/``rediss://``/``unix://`` as redis-py reads them, or the
Sentinel form::

    redis+sentinel://[:password@]host:port[,host:port...]/mastername[/db]

which asks the sentinels for the current primary on every (re)connection, so when they promote
a replica the client follows it. Replication is asynchronous: a write the primary acknowledged
may not have reached a replica when the primary dies. The writes that must survive a failover
(a version published, an adapter accepted) therefore end with :meth:`Durability.confirm`: Redis'
WAIT, until a replica holds them, or :class:`NotDurable` so that the caller does not report as
done what a failover could undo.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from coordinator.errors import Unavailable
from coordinator.ledger import keys

SENTINEL_SCHEME = "redis+sentinel://"


class NotDurable(Unavailable):
    """A write no replica confirmed in time: a failover now could undo it."""


@dataclass(frozen=True)
class Durability:
    """How many replicas must hold a durable write (0: none asked, as with a single Redis) and
    how long to wait for them."""

    replicas: int = 0
    timeout_ms: int = 5000

    def confirm(self, client: redis.Redis, what: str) -> None:
        """Return once ``replicas`` replicas hold every write made before this call (by anyone:
        the stream a replica applies is in order); raise NotDurable, saying ``what``, if they do
        not within the timeout. The WAIT is sent with a write of its own on one connection,
        since WAIT covers only its connection's writes and a pool may hand out another."""
        if self.replicas <= 0:
            return
        pipe = client.pipeline(transaction=False)
        pipe.incr(keys.DURABLE_MARK)
        pipe.wait(self.replicas, self.timeout_ms)
        _, acked = pipe.execute()
        if acked < self.replicas:
            raise NotDurable(f"{what} was written, but {acked} of the {self.replicas} Redis replicas asked for "
                             f"confirmed it within {self.timeout_ms / 1000:g} s; a failover now could undo it. "
                             "Check the replicas (redis-cli INFO replication); the write is retried")


def is_sentinel(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEME)


@dataclass(frozen=True)
class SentinelUrl:
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    password: str | None = None


def parse_sentinel(url: str) -> SentinelUrl:
    """The parts of a ``redis+sentinel://`` URL; ValueError with a sentence when it is not one."""
    example = "redis+sentinel://[:password@]host:port[,host:port]/mastername[/db]"
    rest = url[len(SENTINEL_SCHEME):] if is_sentinel(url) else ""
    netloc, _, path = rest.partition("/")
    password = None
    if "@" in netloc:
        auth, netloc = netloc.rsplit("@", 1)
        password = unquote(auth.split(":", 1)[1] if ":" in auth else auth) or None
    sentinels = []
    for part in filter(None, netloc.split(",")):
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"the sentinel address {part!r} is not host:port; write the URL as {example}")
        sentinels.append((host.strip("[]"), int(port)))
    names = [p for p in path.split("/") if p]
    if not sentinels or not names or len(names) > 2 or (len(names) == 2 and not names[1].isdigit()):
        raise ValueError(f"{url!r} is not a Sentinel URL; write it as {example}")
    return SentinelUrl(tuple(sentinels), names[0], int(names[1]) if len(names) == 2 else 0, password)


def redis_client(url: str) -> redis.Redis:
    """A client that rides out a Redis restart, or with a Sentinel URL a failover: retries with
    exponential backoff (about 40 s in all), then errors."""
    options = dict(retry=Retry(ExponentialBackoff(cap=5.0, base=0.1), retries=12),
                   retry_on_error=[redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError],
                   health_check_interval=15, socket_timeout=30)
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    parsed = parse_sentinel(url)
    sentinel = Sentinel(list(parsed.sentinels), socket_timeout=5.0)
    return sentinel.master_for(parsed.master, db=parsed.db, password=parsed.password, **options)


def durability_for(url: str | None) -> Durability:
    """What a durable write waits for: one replica behind Sentinel (there is one to fail over
    to), none for a single Redis."""
    return Durability(replicas=1) if url and is_sentinel(url) else Durability()
