"""What a volunteer gave: `nomoat worker stats`, read from the ledger for the caller's token.

A volunteer is its token (coordinator.schedule.standing.volunteer_of): every worker registered with it, the
tasks they handed in, the tokens they trained, what became of their adapters (folded, refused
and why, replicas that agreed or not), the versions of the model they are in, and the trust all
of that earned. Plain records; the service turns them into the reply.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from coordinator.observe import status

from coordinator.schedule import standing
from coordinator.schedule.standing import Standing
from coordinator.gateway.auth import Identity
from coordinator.errors import NotFound
from coordinator.ledger import Ledger
from coordinator.settings import Settings


@dataclass(frozen=True)
class VolunteerStats:
    volunteer: str  # its token's name, or the token id
    workers: list[status.WorkerSummary]
    tasks_done: int
    tokens_trained: float
    folded: int
    refused: int
    agreed: int
    disagreed: int
    reasons: dict[str, int]  # failed check -> count
    recent: list[str]  # its newest outcomes, oldest first
    versions: dict[int, int]  # version -> its adapters folded into it
    standing: Standing


def of_caller(ledger: Ledger, settings: Settings, identity: Identity, worker_id: str = "") -> VolunteerStats:
    """The stats of the caller's own volunteer; an admin may name a worker to see its volunteer's.

    Raises NotFound for a worker the ledger does not know (admin only: others always see their own).
    """
    volunteer = identity.token_hash
    if identity.role == "admin" and worker_id:
        worker = ledger.workers.get(worker_id)
        if worker is None:
            raise NotFound(f"there is no worker {worker_id!r}")
        volunteer = standing.volunteer_of(worker.token, worker.worker_id)
    return of(ledger, settings, volunteer)


def of(ledger: Ledger, settings: Settings, volunteer: str) -> VolunteerStats:
    # A volunteer is a token (its hash): its workers are those it registered, read alone. (One
    # registered with no token is its own volunteer.)
    found = ledger.workers.of_token(volunteer) or [w for w in [ledger.workers.get(volunteer)] if w]
    mine = {w.worker_id: w for w in found if standing.volunteer_of(w.token, w.worker_id) == volunteer}
    record = ledger.trust.get(volunteer)
    entry = ledger.tokens.get(volunteer)
    retired = ledger.workers.retired(volunteer)  # its workers gone past retention, summarised
    return VolunteerStats(
        volunteer=(entry.name if entry and entry.name else volunteer[:16]),
        workers=status.summarise(ledger, settings, sorted(mine.values(), key=lambda w: w.last_seen), time.time()),
        tasks_done=sum(w.tasks_done for w in mine.values()) + int(retired["tasks_done"]),
        tokens_trained=sum(w.tokens_trained for w in mine.values()) + retired["tokens_trained"],
        folded=record.accepted if record else 0,
        refused=record.refused if record else 0,
        agreed=record.agreed if record else 0,
        disagreed=record.disagreed if record else 0,
        reasons=record.reasons() if record else {},
        recent=[f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(e.at))}: {e.outcome}"
                + (f": {e.detail}" if e.detail else "") for e in (record.recent if record else ())],
        versions=dict(sorted(record.versions.items())) if record else {},
        standing=standing.standing(record),
    )
