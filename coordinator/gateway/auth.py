"""Who may call what: bearer tokens with roles, checked on every RPC by a server interceptor.

Tokens are random strings shown once; the ledger keeps only their sha256 (the token id), with
the role (coordinator.ledger.tokens). The first start of a coordinator writes an admin token, a
worker token and the join code into its data dir (mode 0600). The join code may only register:
registering with it mints a volunteer token (coordinator.schedule.roster), which has a worker's
rights. The standard gRPC health check stays open. Every method not listed in PERMISSIONS (the
Admin service) is for admin tokens only.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from coordinator.ledger.tokens import ROLES, TokenEntry, Tokens, hash_token, token_id  # noqa: F401 (ROLES, token_id: used from here)

CACHE_S = 5.0  # how long a coordinator trusts a token it looked up; another's revocation waits this long
_CACHE_MAX = 4096

# Which roles may call each method; admin may call everything.
_ANY = {"worker", "volunteer", "trusted-worker", "submitter", "reader", "admin"}
_WORKERS = {"worker", "volunteer", "trusted-worker", "admin"}
# The roles that are given the Ray cluster's token on Register: anyone holding it can run code on
# the coordinator's machine and every Ray node, so plain (public) worker tokens never get it.
RAY_ROLES = frozenset({"trusted-worker", "admin"})
PERMISSIONS: dict[str, set[str]] = {
    "/nomoat.v1.Datasets/Submit": {"submitter", "admin"},
    "/nomoat.v1.Jobs/Status": _ANY,
    "/nomoat.v1.Jobs/Watch": _ANY,
    "/nomoat.v1.Workers/Register": _WORKERS | {"join"},  # the join code's one call
    "/nomoat.v1.Workers/Heartbeat": _WORKERS,
    "/nomoat.v1.Workers/FetchShard": _WORKERS,
    "/nomoat.v1.Workers/Upload": _WORKERS,
    "/nomoat.v1.Workers/UploadOffset": _WORKERS,
    "/nomoat.v1.Workers/UploadTarget": _WORKERS,
    "/nomoat.v1.Workers/RequestWork": _WORKERS,
    "/nomoat.v1.Workers/ReportRun": _WORKERS,
    "/nomoat.v1.Workers/Stats": _WORKERS,  # a volunteer's own record (its token's)
    "/nomoat.v1.Models/Pull": _ANY,
    # Every /nomoat.v1.Admin/ method: admin only (not listed).
}
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
REVOKED = "the operator revoked it"  # how a refusal says the token was revoked (a ban), not unknown
# Who may open the coordinator's HTTP port (coordinator.gateway.web: the dashboard, its API, /metrics).
HTTP_ROLES = {"reader", "admin"}


@dataclass(frozen=True)
class Identity:
    role: str
    name: str
    token_hash: str


def may_join_ray(identity: Identity | None) -> bool:
    """Whether this caller is given the Ray cluster's address and token (trusted machines only)."""
    return identity is not None and identity.role in RAY_ROLES


class TokenRegistry:
    """The ledger's tokens as the interceptor uses them: looked up with a short cache."""

    def __init__(self, tokens: Tokens, cache_s: float = CACHE_S) -> None:
        self.tokens = tokens
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, Identity]] = {}

    def create(self, role: str, name: str = "") -> str:
        return self.tokens.create(role, name)

    def revoke(self, token_or_id: str) -> bool:
        """Revoke a token, given itself or its id; False when no such token is registered.

        Immediate on this coordinator; others trust their cache for up to ``cache_s`` more.
        """
        h = token_id(token_or_id)
        self._cache.pop(h, None)
        return self.tokens.revoke(h)

    def list(self) -> list[TokenEntry]:
        return self.tokens.list()

    def cached(self, token: str) -> Identity | None:
        """The identity of ``token`` if this coordinator looked it up lately (no ledger read)."""
        cached = self._cache.get(hash_token(token))
        return cached[1] if cached and cached[0] > time.monotonic() else None

    def lookup(self, token: str) -> Identity | None:
        h = hash_token(token)
        cached = self._cache.get(h)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        entry = self.tokens.get(h)
        if entry is None:
            self._cache.pop(h, None)
            return None  # misses are not cached: random tokens must not grow the cache
        identity = Identity(entry.role, entry.name, h)
        if entry.role == "join":
            return identity  # never cached: a join code rotated on any gateway is refused on every one at once
        # A short cache keeps Redis off the hot path; another coordinator's revocation takes
        # effect here within cache_s.
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[h] = (time.monotonic() + self.cache_s, identity)
        return identity

    def ensure_file(self, path: Path, role: str) -> str:
        """The token kept in ``path`` (made on first start); re-registered if Redis lost it.

        A token that was revoked is not revived: a new one replaces it in the file.
        """
        if path.exists():
            token = path.read_text().strip()
            h = hash_token(token)
            if self.tokens.revoked(h):
                path.unlink()
                return self.ensure_file(path, role)
            if self.lookup(token) is None:
                self.tokens.restore(h, role, role)
                self._cache.pop(h, None)
            return token
        token = self.create(role, name=f"{role} (data dir)")
        write_secret(path, token)
        return token


def write_secret(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner alone (mode 0600), replacing it whole."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")
    tmp.replace(path)


def bearer(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str:
    for key, value in metadata or ():
        if key == "authorization":
            value = value.decode() if isinstance(value, bytes) else value
            if value.startswith("Bearer "):
                return value[len("Bearer ") :].strip()
    return ""


def caller(context: grpc.ServicerContext, registry: TokenRegistry) -> Identity | None:
    token = bearer(context.invocation_metadata())
    return registry.lookup(token) if token else None


def _denied(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def abort(request_or_iterator, context):  # noqa: ARG001
        await context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


def refusal(method: str, identity: Identity | None, token: str,
            revoked: bool = False) -> tuple[grpc.StatusCode, str] | None:
    """Why ``method`` is refused to the caller (code and sentence), or None when it may call it
    (``revoked``: an unknown token is one the operator revoked)."""
    if not token:
        return grpc.StatusCode.UNAUTHENTICATED, "no token: pass --token or set NOMOAT_TOKEN"
    if identity is None:
        return grpc.StatusCode.UNAUTHENTICATED, ("the token is not valid (unknown or revoked)"
                                                 + (f": {REVOKED}" if revoked else ""))
    allowed = PERMISSIONS.get(method, set())
    if identity.role != "admin" and identity.role not in allowed:
        return grpc.StatusCode.PERMISSION_DENIED, f"a {identity.role} token may not call {method.rsplit('/', 1)[-1]}"
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """The token check of every call on the asyncio server. A token not in the registry's cache
    is looked up in the ledger by ``lookup(method, token)`` (off the loop, in the method's lane)."""

    def __init__(self, registry: TokenRegistry,
                 lookup: Callable[[str, str], Awaitable[Identity | None]] | None = None) -> None:
        self.registry = registry
        self._lookup = lookup

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        token = bearer(handler_call_details.invocation_metadata)
        identity = None
        revoked = False
        if token:
            identity = self.registry.cached(token)
            if identity is None:
                identity = (await self._lookup(method, token) if self._lookup is not None
                            else self.registry.lookup(token))
            if identity is None:
                # Which of the two: a worker whose kept credential is unknown (a new ledger) joins
                # again; one whose credential was revoked (a ban) must not (worker.credentials).
                revoked = await asyncio.to_thread(self.registry.tokens.revoked, hash_token(token))
        refused = refusal(method, identity, token, revoked)
        return handler if refused is None else _denied(handler, *refused)
