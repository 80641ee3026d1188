"""What an admin token may do through the service: manage tokens, roll back, unmerge.

Thin on purpose: the registry and the folder do the work; this turns their refusals into the
errors a caller sees. A rollback or unmerge is carried out by the folding leader, whichever
gateway received it (coordinator.ledger.operations, coordinator.fold.rollback.carry_out): this
queues it and waits for the answer.
"""

from __future__ import annotations

import logging
import time

from coordinator.errors import InvalidRequest, NotFound, Unavailable, WrongState
from coordinator.gateway.auth import TokenRegistry, token_id
from coordinator.ledger import Ledger
from coordinator.ledger.leaders import leader_of
from coordinator.ledger.operations import ROLLBACK, UNMERGE

log = logging.getLogger("nomoat.admin")

WAIT_S = 3600.0  # as long as the CLI waits for a rollback (nomoat.client); a rollback of a big model is slow
POLL_S = 2.0  # how often the wait looks whether the folder that took the request still leads


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


def rollback(ledger: Ledger, version: int, wait_s: float = WAIT_S) -> tuple[int, float]:
    """Publish ``version``'s weights again as a new version; returns (its number, eval loss)."""
    return _by_the_folder(ledger, ROLLBACK, str(version), wait_s)


def unmerge(ledger: Ledger, adapter_id: str, wait_s: float = WAIT_S) -> tuple[int, float]:
    """Publish a new version without one folded adapter; returns (its number, eval loss)."""
    return _by_the_folder(ledger, UNMERGE, adapter_id, wait_s)


def _no_folder(kind: str) -> Unavailable:
    return Unavailable(f"no process leads the folder now, and only the folder may {kind}: start one "
                       "(nomoat coordinator start --role folder, or all) or wait for a standby to take over, "
                       "then try again")


def _leader_token(ledger: Ledger) -> str | None:
    lead = leader_of(ledger.r, "folder")
    return f"{lead[0]}:{lead[1]}" if lead else None


def _by_the_folder(ledger: Ledger, kind: str, arg: str, wait_s: float) -> tuple[int, float]:
    """Queue the operation for the folding leader and wait for its answer: WrongState when the
    history does not allow it, Unavailable when no folder carries it out."""
    if _leader_token(ledger) is None:
        raise _no_folder(kind)
    deadline = time.time() + wait_s
    request = ledger.operations.ask(kind, arg, deadline)
    taken_by = None  # the fence token of the leader that took it
    while (left := deadline - time.time()) > 0:
        answer = ledger.operations.hear(request.id, min(POLL_S, left))
        if answer is None:
            leading = _leader_token(ledger)
            if taken_by is None and leading is None and ledger.operations.withdraw(request):
                raise _no_folder(kind)
            if taken_by is not None and leading != taken_by:
                raise Unavailable(f"the folder that took the {kind} stopped leading before it answered; "
                                  "`nomoat status` shows whether it published a new version: if not, try again")
            continue
        state = answer["state"]
        if state == "started":
            taken_by = answer["leader"]
        elif state == "done":
            return int(answer["version"]), float(answer["loss"])
        elif state == "refused":
            raise WrongState(answer["reason"])
        elif state == "lost":
            raise Unavailable(answer["reason"])
        else:
            raise WrongState(answer["reason"])
    if ledger.operations.withdraw(request):
        raise Unavailable(f"the folder did not take the {kind} within {wait_s:.0f} s (it is busy folding); "
                          "nothing changed: try again")
    raise Unavailable(f"the folder did not finish the {kind} within {wait_s:.0f} s; `nomoat status` shows "
                      "when it publishes the new version")
