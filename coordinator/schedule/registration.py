"""Workers joining: registration, and which workers count as active.

A worker registers with a name and its card; it may ask to keep the id it had. A token may
have at most ``max_workers_per_token`` active workers, so one volunteer's token cannot flood the
scheduler with phantom cards. A worker that registers with the join code becomes a new volunteer
first (coordinator.schedule.roster.mint): it registers under the credential minted for it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from coordinator.gateway.auth import Identity
from coordinator.schedule import roster
from coordinator.errors import InvalidRequest, LimitReached, Unauthenticated
from coordinator.ledger import Ledger, TooManyWorkers
from coordinator.settings import Settings
from nomoat.logs import fields

log = logging.getLogger("nomoat.workers")
ACTIVE_TTLS = 3  # a worker heard from within this many lease lifetimes counts as active
MAX_NAME_CHARS = 200
MAX_ID_CHARS = 64


@dataclass(frozen=True)
class Registration:
    """What a worker says about itself when it joins."""

    worker_id: str  # the id it had, to keep; "" for a new one
    name: str
    node_id: str
    card: bytes  # the serialized Card message, kept as is
    card_name: str
    vram_gb: float


@dataclass(frozen=True)
class Joined:
    worker_id: str
    identity: Identity | None  # whose worker it is: the caller, or the volunteer just minted for it
    credential: str = ""  # the minted volunteer's token (shown once); "" when none was minted


def join(ledger: Ledger, settings: Settings, identity: Identity | None, joining: Registration,
         peer: str = "") -> Joined:
    """Register a worker; a caller with the join code first becomes a new volunteer (rate-limited
    per ``peer`` address and overall: LimitReached). Raises as :func:`register` does."""
    credential = ""
    if identity is not None and identity.role == "join":
        current = ledger.volunteers.join_code()  # the ledger names the one join code every gateway takes
        if current and identity.token_hash != current:
            raise Unauthenticated("this join code was replaced by a newer one; ask the operator for the "
                                  "current join line")
        _check(joining)  # a malformed registration mints nothing
        minted = roster.mint(ledger, settings, joining.name, peer)
        identity, credential = minted.identity, minted.credential
        joining = Registration("", joining.name, joining.node_id, joining.card, joining.card_name, joining.vram_gb)
    return Joined(register(ledger, settings, identity, joining), identity, credential)


def is_active(last_seen: float, now: float, settings: Settings) -> bool:
    return now - last_seen < ACTIVE_TTLS * settings.lease_ttl_s


def register(ledger: Ledger, settings: Settings, identity: Identity | None, joining: Registration) -> str:
    """Admit a worker; returns its id (the one it asked for when it rejoins with the same token).

    Raises InvalidRequest for over-long names, LimitReached when the token has as many active
    workers as it may.
    """
    _check(joining)
    try:
        worker_id, rejoining = ledger.workers.admit(
            joining.worker_id, name=joining.name, card=joining.card, node_id=joining.node_id,
            token=identity.token_hash if identity else "",
            active_since=time.time() - ACTIVE_TTLS * settings.lease_ttl_s, most=settings.max_workers_per_token)
    except TooManyWorkers as exc:
        raise LimitReached(
            f"this token already has {exc.active} active workers, the most one token may have "
            f"(--max-workers-per-token {settings.max_workers_per_token}); stop one, or ask the "
            "operator for another token") from None
    log.info("worker %s %s: %s with %s (%.0f GB)", worker_id, "rejoined" if rejoining else "registered",
             joining.name, joining.card_name, joining.vram_gb,
             extra=fields("worker.rejoined" if rejoining else "worker.registered", worker=worker_id,
                          name=joining.name, card=joining.card_name, vram_gb=joining.vram_gb))
    return worker_id


def _check(joining: Registration) -> None:
    if not joining.name or len(joining.name) > MAX_NAME_CHARS:
        raise InvalidRequest(f"a worker needs a name of at most {MAX_NAME_CHARS} characters")
    if len(joining.node_id) > MAX_NAME_CHARS or len(joining.card_name) > MAX_NAME_CHARS:
        raise InvalidRequest(f"the node id and card name are limited to {MAX_NAME_CHARS} characters")
    if len(joining.worker_id) > MAX_ID_CHARS:
        raise InvalidRequest(f"a worker id is at most {MAX_ID_CHARS} characters")
