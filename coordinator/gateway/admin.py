"""What an admin token may do through the service: manage tokens, roll back, unmerge.

Thin on purpose: the registry and the folder do the work; this turns their refusals into the
errors a caller sees.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from coordinator.gateway.auth import TokenRegistry, token_id
from coordinator.errors import InvalidRequest, NotFound, WrongState

if TYPE_CHECKING:
    from coordinator.fold.folder import Folder

log = logging.getLogger("nomoat.admin")


def create_token(registry: TokenRegistry, role: str, name: str) -> str:
    """A new token (shown once); raises InvalidRequest for an unknown role or an over-long name."""
    try:
        token = registry.create(role, name)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    log.info("a %s token was created (%s)", role, name or role)
    return token


def revoke_token(registry: TokenRegistry, token: str) -> None:
    """Revoke a token given itself or its id; raises NotFound when there is no such token,
    InvalidRequest when none is named."""
    if not token:
        raise InvalidRequest("name the token to revoke, or its token id")
    if not registry.revoke(token):
        raise NotFound("no such token: give the token or its id as `nomoat token list` shows it")
    log.info("token %s was revoked", token_id(token))


def rollback(operations: Folder, version: int) -> tuple[int, float]:
    """Publish ``version``'s weights again as a new version; returns (its number, eval loss)."""
    try:
        return operations.rollback(version)
    except ValueError as exc:
        raise WrongState(str(exc)) from None


def unmerge(operations: Folder, adapter_id: str) -> tuple[int, float]:
    """Publish a new version without one folded adapter; returns (its number, eval loss)."""
    try:
        return operations.unmerge(adapter_id)
    except ValueError as exc:
        raise WrongState(str(exc)) from None
