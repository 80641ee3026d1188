"""The roster of volunteers: an identity minted for each one who joins, and what an operator does
with them (list, ban, clear a record, rotate the join code).

The public join line carries a join code (a token of role ``join``) that may only register.
Registering with it mints a credential for a new volunteer: a ``volunteer`` token of its own,
returned once in the reply and kept by the worker (worker.credentials), whose id is the
volunteer's id. Everything keyed on a volunteer (trust, the workers it may have, the leases its
workers hold, its stats and credit) is keyed on that id, so one volunteer's bad work is its own.

Minting is rate-limited per source address and overall (coordinator.ledger.volunteers, in Redis
so that every gateway agrees), and a new volunteer starts on probation
(coordinator.schedule.standing): many identities buy an attacker only replicated work.

A worker token an admin made is a volunteer too (the operator vouched for it: no probation).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from coordinator.errors import InvalidRequest, LimitReached, NotFound
from pathlib import Path

from coordinator.gateway.auth import Identity, TokenRegistry, hash_token, write_secret
from coordinator.ledger import Ledger
from coordinator.ledger.volunteers import ALL_FULL, SOURCE_FULL
from coordinator.schedule import standing
from coordinator.settings import Settings
from nomoat.logs import fields

log = logging.getLogger("nomoat.roster")
JOIN_CODE_FILE = "join.code"  # the join code's copy in the data dir
VOLUNTEER_ROLES = ("volunteer", "worker", "trusted-worker")  # the tokens that are a volunteer of their own


@dataclass(frozen=True)
class Minted:
    identity: Identity  # the new volunteer's, as its calls will carry it
    credential: str  # its token, shown once


@dataclass(frozen=True)
class VolunteerView:
    volunteer_id: str
    name: str
    role: str
    joined: float
    worker_ids: tuple[str, ...]
    active_workers: int
    standing: str  # a Level, or "banned"
    score: float
    reason: str


def source_of(peer: str) -> str:
    """The address part of a gRPC peer ("ipv4:1.2.3.4:5678" -> "1.2.3.4"; "ipv6:[::1]:5" -> "::1")."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return rest or peer


def mint(ledger: Ledger, settings: Settings, name: str, peer: str) -> Minted:
    """A new volunteer who joined with the join code from ``peer``. Raises LimitReached (a
    sentence) when too many joined from that address, or from everywhere, within the hour."""
    source = source_of(peer)
    refused = ledger.volunteers.admit(source, settings.joins_per_address, settings.joins_overall,
                                      settings.join_window_s)
    if refused == SOURCE_FULL:
        raise LimitReached(f"{settings.joins_per_address} volunteers joined from {source} within the last "
                           f"{settings.join_window_s // 60} minutes, the most one address may; a worker that "
                           "joined already keeps its credential, so try again later, or ask the operator")
    if refused == ALL_FULL:
        raise LimitReached("too many volunteers are joining at once right now; try again in a few minutes")
    credential = ledger.tokens.create("volunteer", name=name[:200])
    volunteer_id = hash_token(credential)
    ledger.volunteers.mint(volunteer_id, name[:200], source)
    log.info("a new volunteer %s joined from %s (%s), on probation", volunteer_id[:12], source, name,
             extra=fields("volunteer.joined", volunteer=volunteer_id, source=source))
    return Minted(Identity("volunteer", name, volunteer_id), credential)


def resolve(ledger: Ledger, given: str) -> str:
    """A volunteer id from what an operator typed: the id, a unique prefix of it, or a worker id."""
    given = given.strip()
    if not given:
        raise InvalidRequest("name the volunteer: its id as `nomoat volunteer list` shows it, or a worker id")
    worker = ledger.workers.get(given)
    if worker is not None:
        return standing.volunteer_of(worker.token, worker.worker_id)
    matches = [e.token_id for e in ledger.tokens.list() if e.role in VOLUNTEER_ROLES and e.token_id.startswith(given)]
    matches += [v.volunteer_id for v in ledger.volunteers.all() if v.volunteer_id.startswith(given)]
    matches = sorted(set(matches))
    if len(matches) != 1:
        raise NotFound(f"no volunteer {given!r}" if not matches else
                       f"{given!r} names {len(matches)} volunteers; give more of its id")
    return matches[0]


def listing(ledger: Ledger, settings: Settings) -> list[VolunteerView]:
    """Every volunteer: those the join code minted and the worker tokens, with their workers and standing."""
    from coordinator.schedule.registration import ACTIVE_TTLS  # (registration imports this module)

    entries = {e.token_id: e for e in ledger.tokens.list() if e.role in VOLUNTEER_ROLES}
    minted = {v.volunteer_id: v for v in ledger.volunteers.all()}
    ids = list(dict.fromkeys([*minted, *entries]))
    records = ledger.trust.many(ids)
    since = time.time() - ACTIVE_TTLS * settings.lease_ttl_s
    workers = ledger.volunteers.workers_of(ids)
    out = []
    for i in ids:
        banned = i in minted and minted[i].banned > 0
        where = standing.standing(records.get(i))
        entry, record = entries.get(i), minted.get(i)
        out.append(VolunteerView(
            volunteer_id=i, name=(record.name if record else entry.name if entry else ""),
            role=entry.role if entry else "volunteer", joined=record.joined if record else entry.created,
            worker_ids=workers[i], active_workers=ledger.workers.active_of(i, since),
            standing="banned" if banned else where.level.value, score=where.score,
            reason="banned by the operator" if banned else where.why))
    return out


def ban(ledger: Ledger, registry: TokenRegistry, volunteer_id: str) -> int:
    """Refuse a volunteer's credential from now on and give the leases its workers hold back to
    the queue; returns how many leases. Other gateways refuse it within their token cache time."""
    registry.revoke(volunteer_id)  # a worker token an admin made leaves the roster with it
    if ledger.volunteers.get(volunteer_id) is not None:
        ledger.volunteers.ban(volunteer_id)
    ledger.trust.ban(volunteer_id)  # no run is placed on its workers, whatever a token cache says
    mine = set(ledger.volunteers.workers_of([volunteer_id])[volunteer_id])
    leased = [lease.task_id for lease in ledger.leases.leased()]
    held = [t.task_id for t in ledger.tasks.many(leased)
            if t.holder_worker and t.holder_worker in mine]  # a lease is bound to the worker it was placed on
    dropped = ledger.volunteers.drop_leases(held)
    log.warning("volunteer %s was banned; %d of its leases go back to the queue", volunteer_id[:12], dropped,
                extra=fields("volunteer.banned", volunteer=volunteer_id, leases=dropped))
    return dropped


def clear(ledger: Ledger, volunteer_id: str) -> None:
    """Forget a volunteer's outcomes (an operator's pardon). One the join code minted starts over
    on probation; a ban stays (a banned credential is never valid again)."""
    record = ledger.volunteers.get(volunteer_id)
    ledger.trust.clear(volunteer_id, probation=record is not None, banned=bool(record and record.banned))
    log.info("the trust record of volunteer %s was cleared", volunteer_id[:12],
             extra=fields("volunteer.cleared", volunteer=volunteer_id))


def ensure_join_code(ledger: Ledger, registry: TokenRegistry, path: Path) -> tuple[str, bool]:
    """The join code kept in ``path`` (made on first start, mode 0600), which the ledger then
    names as the current one (the one a rotation revokes); and whether it was made just now.

    The ledger's is the one every gateway takes: when it names a live join code that is not this
    data dir's (another gateway rotated it), the copy here is out of date and is removed, and no
    code is made (the ledger keeps only its hash, so this process cannot know it): ("", False)."""
    before = path.read_text().strip() if path.exists() else ""
    current = ledger.volunteers.join_code()
    if current and current != hash_token(before) and ledger.tokens.get(current) is not None:
        if before:
            path.unlink(missing_ok=True)
            log.warning("the join code was rotated on another gateway: %s held an older one and was removed; "
                        "the join line carries the code `nomoat volunteer rotate-join-code` printed", path)
        return "", False
    code = registry.ensure_file(path, "join")
    if current != hash_token(code):
        ledger.volunteers.set_join_code(hash_token(code))
    return code, code != before


def rotate_join_code(ledger: Ledger, registry: TokenRegistry, path: Path | None = None) -> str:
    """A new join code (shown once, and kept in ``path``, the data dir's copy); the previous one
    stops working on every gateway at once (the ledger names the current one: registration takes
    no other), volunteers who joined with it keep working."""
    old = ledger.volunteers.join_code()
    code = registry.create("join", name="join code")
    ledger.volunteers.set_join_code(hash_token(code))
    if path is not None:
        write_secret(path, code)
    if old:
        registry.revoke(old)
    log.info("the join code was rotated", extra=fields("join.rotated"))
    return code
