"""Trust: what a volunteer's contributions earned, and how much work it gets for it.

One pure rule, :func:`standing`, reads a volunteer's :class:`~coordinator.ledger.TrustRecord`
(its newest outcomes: adapters folded, replicas that agreed, checks failed) and says where it
stands. The scheduler asks :func:`allowed_share` how large a run the volunteer's card may take
(0: none), the collect step asks :func:`replicate_rate` how many of its tasks are run a second
time by another volunteer, and ``nomoat status`` shows :attr:`Standing.why`.

The score is a Beta posterior mean over the last ``WINDOW`` outcomes, started from
``PRIOR_GOOD`` good outcomes so that a new volunteer is trusted:

    score = (good + PRIOR_GOOD) / (good + bad + PRIOR_GOOD)

with each outcome weighed by :data:`WEIGHTS` (an adapter folded counts 1, a replica that
agreed 2; a failed check 1, a fold's worst contributor 0.5, a disagreement with two replicas 2,
a lease abandoned (expired with no report or hand-back) 1; staleness is the schedule's doing and
counts nothing). Below ``THROTTLE`` a volunteer is
throttled, on probation: it gets one task at a time (a run of one unit, served after trusted
cards, and the next only once the last one it handed in is settled), and every task it hands in
is replicated, so it can earn its way back only with work that others reproduce. Below
``EXCLUDE`` it gets no tasks. A malicious volunteer (every adapter refused) is throttled after 3
failures and excluded after 7 (with disagreements, after 2 and 4); an honest one with 30
adapters folded stays trusted through 15 failures in a row of the window.

A volunteer the join code minted starts on probation (:attr:`Level.PROBATION`): one task at a time,
every task replicated, until it has earned ``PROBATION_EARN`` in good outcomes (an adapter folded
counts 1, a replica that agreed 2), so that minting many identities buys nothing but replicated
work. A worker token an admin made is a volunteer the operator vouched for: it starts trusted.

Only the newest ``WINDOW`` outcomes count: years of good work do not buy a volunteer unlimited
bad work later. An excluded volunteer earns nothing new, so it stays excluded until an operator
clears its record (:meth:`coordinator.ledger.trust.Trust.clear`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from coordinator.ledger.records import Check, TrustEvent, TrustRecord
from coordinator.ledger.trust import KEPT as WINDOW  # the newest outcomes the score reads: all the ledger keeps
PRIOR_GOOD = 2.0  # a new volunteer starts as if two of its adapters had been folded
THROTTLE = 0.5  # below: fewer tasks, and every one replicated
EXCLUDE = 0.25  # below: no tasks
PROBATION_EARN = 4.0  # good outcomes (WEIGHTS) a new volunteer earns before it leaves probation
PROBATION_SHARE = 0.5  # a share below 1: one unit at a time (units)

# A lease its holder let expire without a report or a hand-back: the task waited a lease lifetime
# for nothing (it goes back in the queue without spending an attempt; its volunteer pays here).
ABANDONED = "abandoned"

# How much each outcome counts: positive for good work, negative for a failed check.
WEIGHTS: dict[str, float] = {
    "accepted": 1.0,
    "agreed": 2.0,
    Check.CORRUPT.value: -1.0,
    Check.MALFORMED.value: -1.0,
    Check.NORM.value: -1.0,
    Check.LOSS.value: -1.0,
    Check.FOLD.value: -0.5,  # an honest adapter can be the worst of a fold that did not publish
    Check.STALE.value: 0.0,
    Check.DISAGREED.value: -2.0,  # two other volunteers reproduced the task, and it did not
    ABANDONED: -1.0,  # as a failed check: take-and-abandon is excluded as fast as bad work
    Check.SHARD.value: -1.0,  # honest adapters fail it about as rarely as the loss gate (bench/shardproof.py)
    Check.COPY.value: -2.0,  # byte for byte another task's adapter: no honest run does that
}


class Level(str, Enum):
    TRUSTED = "trusted"
    PROBATION = "probation"
    THROTTLED = "throttled"
    EXCLUDED = "excluded"

    __str__ = str.__str__


@dataclass(frozen=True)
class Standing:
    level: Level
    score: float
    share: float  # 1: whole runs; between 0 and 1: one unit at a time (the score); 0: no task now
    why: str = ""  # a sentence, "" when trusted

    @property
    def eligible(self) -> bool:
        return self.share > 0


TRUSTED = Standing(Level.TRUSTED, 1.0, 1.0)  # a volunteer with no record (or a node that names none)


def score(recent: Sequence[TrustEvent]) -> float:
    """The Beta posterior mean of good work over the newest ``WINDOW`` outcomes."""
    good = bad = 0.0
    for event in list(recent)[-WINDOW:]:
        weight = WEIGHTS.get(event.outcome, -1.0)  # an outcome unknown here counts as a failure
        if weight > 0:
            good += weight
        else:
            bad -= weight
    return (good + PRIOR_GOOD) / (good + bad + PRIOR_GOOD)


def earned(record: TrustRecord) -> float:
    """The good outcomes a volunteer has to its name since its record began (or was cleared)."""
    return record.accepted * WEIGHTS["accepted"] + record.agreed * WEIGHTS["agreed"]


def standing(record: TrustRecord | None) -> Standing:
    """Where a volunteer stands, from its record alone (None: nothing known, trusted)."""
    if record is None or (not record.recent and not record.probation and not record.banned):
        return TRUSTED
    if record.banned:
        return Standing(Level.EXCLUDED, 0.0, 0.0, "excluded: banned by the operator")
    s = score(record.recent)
    on_probation = record.probation and earned(record) < PROBATION_EARN
    if s >= THROTTLE and on_probation:
        share = 0.0 if record.held > 0 else PROBATION_SHARE
        return Standing(Level.PROBATION, s, share, f"on probation (a new volunteer): one task at a time, each "
                                                   f"checked by a replica, until it has earned "
                                                   f"{earned(record):g} of {PROBATION_EARN:g}")
    if s >= THROTTLE:
        return Standing(Level.TRUSTED, s, 1.0)
    failed = [e for e in record.recent[-WINDOW:] if e.failed and WEIGHTS.get(e.outcome, -1.0) < 0]
    kinds = sorted({e.outcome for e in failed})
    last = failed[-1].detail if failed else ""
    because = (f"{len(failed)} of its last {min(len(record.recent), WINDOW)} contributions failed the checks "
               f"({', '.join(kinds)})" + (f"; the latest: {last}" if last else ""))
    if s < EXCLUDE:
        return Standing(Level.EXCLUDED, s, 0.0, f"excluded (trust {s:.2f}): {because}")
    # On probation: one task at a time, each checked by replicas before it is given the next.
    share = 0.0 if record.held > 0 else s
    return Standing(Level.THROTTLED, s, share, f"throttled: one task at a time, each checked by a replica "
                                               f"(trust {s:.2f}): {because}")


def allowed_share(record: TrustRecord | None) -> float:
    """The share of a normal run a volunteer's card is given: 1 when trusted, 0 when excluded."""
    return standing(record).share


def eligible(record: TrustRecord | None) -> bool:
    """Whether a volunteer may be given tasks at all."""
    return standing(record).eligible


def units(n: int, share: float) -> int:
    """How many of a run's ``n`` units a volunteer with ``share`` is given: all when trusted, one
    on probation, none when it may take no task now."""
    if share <= 0:
        return 0
    return n if share >= 1.0 else min(n, 1)


def replicate_rate(record: TrustRecord | None, fraction: float) -> float:
    """The chance a task this volunteer hands in is run again by another: the configured
    ``fraction`` for a trusted volunteer, every task for one on probation or throttled."""
    return fraction if standing(record).level is Level.TRUSTED else 1.0


def volunteer_of(token_hash: str, worker_id: str) -> str:
    """Whose work it is: the token it was done with (one per volunteer: the credential the join
    code minted for it, or a worker token an admin made; its several cards are one volunteer),
    else the worker id (a caller with no token of its own, admin)."""
    return token_hash or worker_id
