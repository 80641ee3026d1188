"""Tokens: bearer tokens by their sha256 (the token id), with a role and a name.

Tokens are random strings shown once; the ledger keeps only their id. A revoked id is also kept
apart, so a token written in a data dir is never revived by a restart. Checking a caller's
token on every call (with a short cache) is coordinator.gateway.auth's part.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass

import redis

from coordinator.ledger import keys

# trusted-worker: a worker that may also join the Ray cluster (it receives the Ray token, and so
# may run code on every node): for machines that trust each other, never for the public.
# join: the public join code, which may only register; registering with it mints a volunteer
# token (coordinator.schedule.roster): one identity per volunteer, with the rights of a worker.
ROLES = ("worker", "trusted-worker", "submitter", "reader", "admin", "volunteer", "join")


@dataclass(frozen=True)
class TokenEntry:
    token_id: str  # sha256 of the token
    role: str
    name: str
    created: float


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_id(token_or_id: str) -> str:
    """A token id is given as is (64 hex digits); a token becomes its id."""
    if len(token_or_id) == 64 and all(c in "0123456789abcdef" for c in token_or_id):
        return token_or_id
    return hash_token(token_or_id)


class Tokens:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    def create(self, role: str, name: str = "") -> str:
        """A new token for ``role``; the token itself is returned once and never stored."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
        if len(name) > 200:
            raise ValueError("a token name may be at most 200 characters")
        token = f"nmt_{role[0]}_{secrets.token_urlsafe(24)}"
        self.restore(hash_token(token), role, name or role)
        return token

    def restore(self, token_hash: str, role: str, name: str) -> None:
        """Register a token by its id (one kept in a data dir that Redis lost)."""
        self.r.hset(keys.TOKENS, token_hash, json.dumps({"role": role, "name": name, "created": time.time()}))

    def get(self, token_hash: str) -> TokenEntry | None:
        raw = self.r.hget(keys.TOKENS, token_hash)
        return _entry(token_hash, raw) if raw else None

    def revoke(self, token_hash: str) -> bool:
        """Revoke a token by its id; False when no such token is registered."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hdel(keys.TOKENS, token_hash)
        pipe.sadd(keys.REVOKED, token_hash)
        removed, _ = pipe.execute()
        return bool(removed)

    def revoked(self, token_hash: str) -> bool:
        return bool(self.r.sismember(keys.REVOKED, token_hash))

    def list(self) -> list[TokenEntry]:
        """Every registered token (by id, never the token itself), oldest first."""
        entries = [_entry(h.decode(), raw) for h, raw in self.r.hgetall(keys.TOKENS).items()]
        return sorted(entries, key=lambda e: (e.created, e.token_id))


def _entry(token_hash: str, raw: bytes | str) -> TokenEntry:
    record = json.loads(raw)
    return TokenEntry(token_hash, record["role"], record.get("name", ""), float(record.get("created", 0.0)))
