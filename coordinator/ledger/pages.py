"""Pages: a sorted set read newest first, a page at a time, from a cursor.

What grows with history (finished jobs, workers no longer heard from, versions) is listed this
way, so a status call or a scrape reads one page however long the ledger has lived. A cursor is
the (score, member) of the last entry a page returned: members with the same score are ordered
by name (as Redis orders them), so nothing is skipped or listed twice across pages.
"""

from __future__ import annotations

from collections.abc import Container

import redis

Cursor = tuple[float, str]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def older(client: redis.Redis, key: str, limit: int, after: Cursor | None = None, top: float | str = "+inf",
          skip: Container[str] = frozenset()) -> tuple[list[tuple[str, float]], Cursor | None]:
    """Up to ``limit`` members of the sorted set ``key``, highest score first, scored at most
    ``top`` and below the cursor ``after``, leaving out those in ``skip``; with the cursor of the
    next page (None when there is none)."""
    found: list[tuple[str, float]] = []
    high = after[0] if after else top
    offset, chunk = 0, max(limit + 1, 16)
    while True:
        rows = client.zrevrangebyscore(key, high, "-inf", start=offset, num=chunk, withscores=True)
        for raw, score in rows:
            member = _text(raw)
            if after and score == after[0] and member >= after[1]:
                continue  # at the cursor's score, Redis lists names in reverse order: these came before
            if member in skip:
                continue
            if len(found) == limit:
                last = found[-1]
                return found, (last[1], last[0])
            found.append((member, score))
        if len(rows) < chunk:
            return found, None
        offset += chunk
