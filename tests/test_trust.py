"""Trust: the pure rule (coordinator.schedule.standing), the replication rule (coordinator.schedule.replication's
pure part), and the ledger's trust records over the session's real redis-server."""

from __future__ import annotations

import torch
import pytest

from coordinator.schedule import replication

from coordinator.schedule import standing
from coordinator.ledger import Check, Ledger, TrustEvent, TrustRecord
from coordinator.schedule.replication import ReplicationPolicy, Run, decide, distance, sampled
from nomoat.adapter import Adapter


def record(*outcomes: str) -> TrustRecord:
    return TrustRecord("v", {}, tuple(TrustEvent(float(i), o, f"reason {i}") for i, o in enumerate(outcomes)))


# -- the trust rule ---------------------------------------------------------------------------


def test_a_new_volunteer_is_trusted_with_a_whole_run() -> None:
    for new in (None, record()):
        where = standing.standing(new)
        assert where.level is standing.Level.TRUSTED and where.share == 1.0 and where.why == ""
        assert standing.allowed_share(new) == 1.0 and standing.eligible(new)


def minted(*outcomes: str, held: int = 0) -> TrustRecord:
    """The record of a volunteer the join code minted (on probation), with these outcomes."""
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o] = counts.get(o, 0) + 1
    events = tuple(TrustEvent(float(i), o, "") for i, o in enumerate(outcomes))
    return TrustRecord("v", counts, events, held=held, probation=True)


def test_a_volunteer_the_join_code_minted_is_on_probation_until_it_has_earned_trust() -> None:
    fresh = standing.standing(minted())
    assert fresh.level is standing.Level.PROBATION and "on probation" in fresh.why
    assert standing.units(8, fresh.share) == 1  # one unit at a time
    assert standing.replicate_rate(minted(), 0.05) == 1.0  # every unit replicated
    assert standing.standing(minted(held=1)).share == 0  # the next only once the last is checked
    assert standing.standing(minted("accepted", "accepted", "accepted")).level is standing.Level.PROBATION
    for earned in (("accepted",) * 4, ("agreed",) * 2, ("agreed", "accepted", "accepted")):
        where = standing.standing(minted(*earned))
        assert where.level is standing.Level.TRUSTED and where.share == 1.0, earned
    # Failing the checks on probation throttles and then excludes as it does anyone.
    assert standing.standing(minted(*[Check.NORM.value] * 3)).level is standing.Level.THROTTLED
    assert standing.standing(minted(*[Check.NORM.value] * 7)).level is standing.Level.EXCLUDED


def test_a_banned_volunteer_is_excluded_whatever_its_record() -> None:
    banned = TrustRecord("v", {"accepted": 30}, tuple(TrustEvent(float(i), "accepted", "") for i in range(30)),
                         banned=True)
    where = standing.standing(banned)
    assert where.level is standing.Level.EXCLUDED and not where.eligible and "banned" in where.why


@pytest.mark.parametrize("failures, level", [
    (2, standing.Level.TRUSTED), (3, standing.Level.THROTTLED), (6, standing.Level.THROTTLED), (7, standing.Level.EXCLUDED),
])
def test_failed_checks_throttle_then_exclude(failures: int, level: standing.Level) -> None:
    where = standing.standing(record(*[Check.NORM.value] * failures))
    assert where.level is level
    if level is standing.Level.THROTTLED:
        assert 0 < where.share < 1 and where.why.startswith("throttled")
        assert f"{failures} of its last {failures} contributions failed the checks (norm)" in where.why
    if level is standing.Level.EXCLUDED:
        assert where.share == 0 and not standing.eligible(record(*[Check.NORM.value] * failures))
        assert where.why.startswith("excluded") and "the latest: reason 6" in where.why


def test_disagreements_weigh_twice() -> None:
    assert standing.standing(record(Check.DISAGREED.value)).level is standing.Level.TRUSTED
    assert standing.standing(record(*[Check.DISAGREED.value] * 2)).level is standing.Level.THROTTLED
    assert standing.standing(record(*[Check.DISAGREED.value] * 4)).level is standing.Level.EXCLUDED


def test_good_work_outweighs_occasional_failures_but_only_within_the_window() -> None:
    honest = ["accepted"] * 30 + [Check.LOSS.value] * 2
    assert standing.standing(record(*honest)).level is standing.Level.TRUSTED
    # A long good history does not buy unlimited bad work: only the newest WINDOW outcomes count.
    turned = ["accepted"] * 200 + [Check.LOSS.value] * 26  # 6 good, 26 bad in the window: 8/34
    assert standing.standing(record(*turned)).level is standing.Level.EXCLUDED
    # Replicas that agree earn trust back faster than plain folds.
    assert standing.score(record(*[Check.NORM.value] * 3, "agreed").recent) > \
        standing.score(record(*[Check.NORM.value] * 3, "accepted").recent)


def test_a_throttled_volunteer_waits_until_its_last_task_is_checked() -> None:
    throttled = record(*[Check.NORM.value] * 3)
    assert standing.standing(throttled).share > 0
    waiting = TrustRecord("v", {}, throttled.recent, held=1)
    assert standing.standing(waiting).level is standing.Level.THROTTLED and standing.allowed_share(waiting) == 0
    trusted = TrustRecord("v", {}, record("accepted").recent, held=3)  # a trusted one is not held back
    assert standing.allowed_share(trusted) == 1.0


def test_staleness_is_not_held_against_a_volunteer() -> None:
    assert standing.standing(record(*[Check.STALE.value] * 20)).score == 1.0


def test_runs_are_cut_to_the_share_and_throttled_volunteers_are_always_replicated() -> None:
    assert standing.units(8, 1.0) == 8 and standing.units(8, 0.4) == 1 and standing.units(8, 0.01) == 1
    assert standing.units(8, 0.0) == 0
    assert standing.replicate_rate(None, 0.05) == 0.05
    assert standing.replicate_rate(record(*[Check.NORM.value] * 3), 0.05) == 1.0


def test_a_volunteer_is_its_token() -> None:
    assert standing.volunteer_of("tokenhash", "w-1") == "tokenhash"
    assert standing.volunteer_of("", "w-1") == "w-1"


# -- the replication rule -----------------------------------------------------------------------


def adapter(seed: int, scale: float = 1.0) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    factors = {m: (torch.randn(2, 16, generator=gen) * 0.01, torch.randn(24, 2, generator=gen) * 0.01 * scale)
               for m in ("layers.0.q_proj", "layers.0.v_proj")}
    return Adapter(factors, rank=2, alpha=4.0)


def test_the_distance_of_two_updates() -> None:
    a = adapter(0)
    assert distance(a, adapter(0)) == 0.0
    assert distance(a, adapter(0, scale=50.0)) == pytest.approx(49 / 50, rel=1e-5)
    assert 1.2 < distance(a, adapter(1)) < 1.6  # independent random updates: about sqrt(2)
    # Against the dense difference of ΔW = s·B·A, module by module.
    b = adapter(1)
    dense = sum(float(((a.scale * (a.factors[m][1] @ a.factors[m][0]) - b.scale * (b.factors[m][1] @ b.factors[m][0]))
                       .double() ** 2).sum()) for m in a.factors) ** 0.5
    larger = max(sum(float(((x.scale * x.factors[m][1] @ x.factors[m][0]).double() ** 2).sum())
                     for m in x.factors) ** 0.5 for x in (a, b))
    assert distance(a, b) == pytest.approx(dense / larger, rel=1e-5)


def test_agreement_needs_the_update_and_the_loss() -> None:
    policy = ReplicationPolicy(tolerance=0.05, loss_tolerance=0.02)
    assert replication.agree(adapter(0), adapter(0), 2.50, 2.51, policy)
    assert not replication.agree(adapter(0), adapter(0), 2.50, 2.55, policy)
    assert not replication.agree(adapter(0), adapter(0, scale=50), 2.5, 2.5, policy)


KEY = bytes(range(32))


def test_sampling_is_a_fixed_share_of_tasks() -> None:
    ids = [f"j-1-t{i:04d}" for i in range(4000)]
    share = sum(sampled(t, 0.05, KEY) for t in ids) / len(ids)
    assert 0.04 < share < 0.06
    assert [sampled(t, 0.05, KEY) for t in ids] == [sampled(t, 0.05, KEY) for t in ids]
    assert not any(sampled(t, 0.0, KEY) for t in ids) and all(sampled(t, 1.0, KEY) for t in ids)


def test_which_tasks_are_checked_cannot_be_computed_from_their_ids() -> None:
    """The sample is keyed: another key picks other tasks, and the unkeyed hash a volunteer
    could compute (sha256 of the id, as before) is no guide to it."""
    import hashlib

    ids = [f"j-1-t{i:04d}" for i in range(4000)]
    ours = {t for t in ids if sampled(t, 0.05, KEY)}
    other_key = {t for t in ids if sampled(t, 0.05, bytes(32))}
    unkeyed = {t for t in ids
               if int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "big") / 2.0**64 < 0.05}
    # Two independent 5 % samples share about 5 % of their members; the same one would share all.
    assert len(ours & other_key) < 0.3 * len(ours) and len(ours & unkeyed) < 0.3 * len(ours)


RUNS = [Run("t", "a0", "alice"), Run("t.r1", "a1", "bob"), Run("t.r2", "a2", "carol")]


def agreeing(*pairs: tuple[int, int]):
    return lambda i, j: (i, j) in pairs or (j, i) in pairs


def test_one_result_waits_for_its_replica_or_is_folded_unverified() -> None:
    assert decide("t", RUNS[:1], agreeing(), waiting=True, opened=2).wait
    verdict = decide("t", RUNS[:1], agreeing(), waiting=False, opened=2)
    assert verdict.settlement.state == "unverified" and verdict.settlement.fold == "a0"
    assert verdict.settlement.outcomes == ()


def test_two_that_agree_fold_one() -> None:
    how = decide("t", RUNS[:2], agreeing((0, 1)), waiting=False, opened=2).settlement
    assert how.fold == "a0" and [a for a, _ in how.replicas] == ["a1"] and how.rejected == ()
    assert sorted(how.outcomes) == [("alice", "agreed", "task t: 2 runs agreed"),
                                    ("bob", "agreed", "task t: 2 runs agreed")]


def test_two_that_disagree_ask_a_third_and_its_majority_settles() -> None:
    assert decide("t", RUNS[:2], agreeing(), waiting=False, opened=2).third
    assert decide("t", RUNS[:2], agreeing(), waiting=True, opened=3).wait
    how = decide("t", RUNS, agreeing((0, 2)), waiting=False, opened=3).settlement
    assert how.fold == "a0" and [a for a, _ in how.replicas] == ["a2"]
    assert [a for a, _ in how.rejected] == ["a1"]
    assert ("bob", Check.DISAGREED.value) in [(v, o) for v, o, _ in how.outcomes]
    assert {v for v, o, _ in how.outcomes if o == "agreed"} == {"alice", "carol"}
    # The task's own run can be the outlier: then a replica is folded.
    how = decide("t", RUNS, agreeing((1, 2)), waiting=False, opened=3).settlement
    assert how.fold == "a1" and [a for a, _ in how.rejected] == ["a0"]


def test_no_majority_rejects_every_run_without_blame() -> None:
    how = decide("t", RUNS, agreeing(), waiting=False, opened=3).settlement
    assert how.state == "unsettled" and how.fold == "" and len(how.rejected) == 3 and how.outcomes == ()
    how = decide("t", RUNS[:2], agreeing(), waiting=False, opened=3).settlement
    assert how.state == "unsettled" and len(how.rejected) == 2 and how.outcomes == ()


# -- the ledger's trust records ---------------------------------------------------------------


def test_trust_records_count_and_keep_the_newest(ledger: Ledger) -> None:
    assert ledger.trust.get("alice") is None
    for i in range(40):
        ledger.trust.record("alice", "accepted" if i % 4 else Check.LOSS.value, f"event {i}")
    got = ledger.trust.get("alice")
    assert got.accepted == 30 and got.refused == 10 and got.reasons() == {"loss": 10}
    assert len(got.recent) == standing.WINDOW and got.recent[-1].detail == "event 39"
    assert [e.detail for e in got.recent] == [f"event {i}" for i in range(40 - standing.WINDOW, 40)]
    assert ledger.trust.many(["alice", "bob"]).keys() == {"alice"}
    ledger.trust.clear("alice")
    assert ledger.trust.get("alice") is None


def test_a_rejection_counts_against_the_adapters_volunteer_in_the_same_step(ledger: Ledger) -> None:
    from tests.test_scheduler import make_job

    task = make_job(ledger, "j", 1)[0]
    fence = ledger.leases.lease(task, 1e12, 0, 3)
    accepted = ledger.adapters.accept(task, fence, "ab" * 32, tokens=10, volunteer="mallory")
    assert ledger.adapters.get(accepted.detail).volunteer == "mallory"
    ledger.adapters.reject(accepted.detail, "it makes held-out loss worse", check=Check.LOSS)
    mallory = ledger.trust.get("mallory")
    assert mallory.reasons() == {"loss": 1} and mallory.recent[-1].detail == "it makes held-out loss worse"
    # A rejection that names no check (a blob the store lost) is not held against anyone.
    ledger.adapters.reject(accepted.detail, "the blob is gone")
    assert ledger.trust.get("mallory").refused == 1


def test_workers_map_to_their_token(ledger: Ledger) -> None:
    ledger.workers.register("w-a", name="a", card=b"", token="tok-a")
    ledger.workers.register("w-b", name="b", card=b"")
    assert ledger.trust.of_workers(["w-a", "w-b", ""]) == {"w-a": "tok-a", "w-b": "w-b"}
