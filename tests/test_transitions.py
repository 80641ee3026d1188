"""Multi-step transitions are atomic and safe to retry, against a real redis-server.

Each test is one race found by reading the code, made to happen for real: an upload accepted
while its speculative twin is being created; a reply lost on the wire, after which the Redis
client runs the same script again on a new connection (tests/flaky.py); a run whose dispatch
fails after its units were leased; a report handed on while the scheduler that placed its run
is gone.
"""

from __future__ import annotations

import json
import time

import pytest

from coordinator.ledger import Ledger, RunReport, TaskState
from coordinator.schedule.inbox_dispatch import OutboundDispatcher
from coordinator.schedule.scheduler import Scheduler
from coordinator.schedule.transport import Need
from coordinator.server import redis_client as coordinator_redis
from coordinator.settings import Settings
from nomoat.spec import UnitResult
from tests import consistency
from tests.fakes import FakeCard, FakeDispatcher
from tests.flaky import LosesReplies
from tests.test_ledger import make_job


@pytest.fixture
def flaky(redis_server, ledger):  # ``ledger`` first: the database is flushed before the proxy is used
    proxy = LosesReplies(redis_server.url)
    client = coordinator_redis(proxy.url)
    yield proxy, Ledger(client)
    client.close()
    proxy.close()


# -- the twin accept race ------------------------------------------------------------------------


def test_an_upload_accepted_while_its_twin_is_created_leaves_the_twin_nothing_to_accept(ledger) -> None:
    (task,) = make_job(ledger, n_tasks=1)
    fence = ledger.leases.lease(task, time.time() + 60, 0, max_attempts=3)
    script = ledger.adapters._accept
    created = []

    def twin_created_meanwhile(*args, **kwargs):
        # The scheduler's speculation lands between the upload's start and its acceptance script.
        created.append(ledger.leases.speculate(task, time.time() + 60))
        return script(*args, **kwargs)

    ledger.adapters._accept = twin_created_meanwhile
    first = ledger.adapters.accept(task, fence, "a" * 64, tokens=10)
    ledger.adapters._accept = script
    (twin, twin_fence), = created
    assert first.status == "accepted" and twin_fence > 0
    assert ledger.tasks.get(twin).state is TaskState.DONE  # completed with its original, in the same step
    second = ledger.adapters.accept(twin, twin_fence, "b" * 64, tokens=10)
    assert second.status == "refused", "both runs of one shard were accepted: it would be folded twice"
    assert len(ledger.adapters.buffer_ids()) == 1
    consistency.check(ledger)


# -- scripts a retry would repeat ----------------------------------------------------------------


def test_a_lease_whose_reply_was_lost_is_granted_once_and_its_fence_answered(flaky) -> None:
    proxy, ledger = flaky
    first, second = make_job(ledger, n_tasks=2)
    ledger.leases.lease(first, time.time() + 60, 0, max_attempts=3)  # the script is loaded: the next call runs it
    proxy.lose_next_reply()
    fence = ledger.leases.lease(second, time.time() + 60, 0, max_attempts=3)
    assert proxy.dropped == 1
    task = ledger.tasks.get(second)
    assert task.state is TaskState.LEASED and task.attempts == 1
    assert fence == task.fence, "the retry answered 0: the lease was granted under a fence nobody holds"
    consistency.check(ledger)


def test_a_twin_whose_reply_was_lost_is_created_once_and_its_fence_answered(flaky) -> None:
    proxy, ledger = flaky
    first, second = make_job(ledger, n_tasks=2)
    for task in (first, second):
        ledger.leases.lease(task, time.time() + 60, 0, max_attempts=3)
    ledger.leases.speculate(first, time.time() + 60)
    proxy.lose_next_reply()
    twin, fence = ledger.leases.speculate(second, time.time() + 60)
    assert proxy.dropped == 1
    assert fence > 0 and fence == ledger.tasks.get(twin).fence, "the retry answered 0: a twin nobody runs"
    assert int(ledger.r.hget("nomoat:counters", "speculations")) == 2


def test_a_run_whose_placement_reply_was_lost_is_in_the_inbox_once(flaky) -> None:
    proxy, ledger = flaky
    ledger.inbox.place("r-first", "w-1", [("t0", 1)], ["{}"])
    proxy.lose_next_reply()
    ledger.inbox.place("r-second", "w-1", [("t1", 2)], ["{}"])
    assert proxy.dropped == 1
    runs = [json.loads(raw)["run_id"] for raw in ledger.r.lrange("nomoat:outbound:inbox:w-1", 0, -1)]
    assert runs == ["r-first", "r-second"], f"a retried placement put a run in twice: {runs}"


def test_a_report_whose_reply_was_lost_still_reaches_the_scheduler(flaky) -> None:
    proxy, ledger = flaky
    ledger.inbox.place("r-1", "w-1", [("t0", 1)], ["{}"])
    ledger.inbox.report(RunReport("r-0", "w-1", (), ()))  # the script is loaded
    proxy.lose_next_reply()
    ledger.inbox.report(RunReport("r-1", "w-1", (), ("t0",)))
    assert proxy.dropped == 1
    taken = [r.run_id for r in ledger.inbox.reports()]
    assert taken == ["r-0", "r-1"], "the run was marked reported but its report never passed on"
    assert ledger.inbox.report(RunReport("r-1", "w-1", (), ())) is False  # still once per run


# -- a lease and its dispatch, a report and its run ---------------------------------------------


class BrokenTransport(FakeDispatcher):
    """The fake cluster, with one card whose transport refuses every run (a Redis or Ray error)."""

    def __init__(self, cards: list[FakeCard], broken: str) -> None:
        super().__init__(cards)
        self.broken = broken

    def submit(self, specs, resources, node_id):
        if node_id == self.broken:
            raise ConnectionError("the transport to this card is down")
        super().submit(specs, resources, node_id)


def test_a_run_that_cannot_be_dispatched_gives_its_units_back_and_the_round_goes_on(ledger) -> None:
    cards = [FakeCard("a", 24.0, 100.0), FakeCard("b", 24.0, 100.0)]
    fake = BrokenTransport(cards, broken=cards[0].node_id)
    settings = Settings(data_dir="/nonexistent", speculate=False, target_task_seconds=1.0)
    scheduler = Scheduler(settings, ledger, fake, "token", task_need=lambda config: Need(1.0))
    ids = make_job(ledger, n_tasks=4)
    scheduler.tick(fake.now)
    states = {t: ledger.tasks.get(t) for t in ids}
    leased = [t for t, task in states.items() if task.state is TaskState.LEASED]
    assert leased and fake.in_flight() == 1, "the card after the broken one got no run this round"
    for task_id, task in states.items():  # the broken card's units: queued again, no attempt spent
        if task_id not in leased:
            assert task.state is TaskState.PENDING and task.attempts == 0, (task_id, task)
    consistency.check(ledger)


def test_a_report_on_a_run_another_scheduler_placed_is_handled(ledger) -> None:
    (task,) = make_job(ledger, n_tasks=1)
    fence = ledger.leases.lease(task, time.time() + 60, 0, max_attempts=3)
    ledger.inbox.place("r-old", "w-1", [(task, fence)], ["{}"])  # by a scheduler that died since
    failed = UnitResult(task, fence, "RuntimeError: the trainer failed")
    ledger.inbox.report(RunReport("r-old", "w-1", (json.dumps(failed.to_dict()),), ()))
    successor = OutboundDispatcher(ledger)
    (done,) = successor.poll()
    assert (done.task_id, done.fence, done.error) == (task, fence, failed.error)
