"""Leaders killed mid-work, with a standby of each running: the standby takes over, the job
finishes, and every task is folded exactly once.

The processes are real, started through the command line, sharing one Redis (a standalone
redis-server, as --redis-url names one in production) and one data dir (the blob store): a
gateway that the volunteers and the submitter talk to, and several ``--role all`` processes,
each of which campaigns for the scheduler's and the folder's leader leases. The volunteers are
outbound-only (no Ray: ``--ray-address off``), so nothing but the leases ties a run to the
process that placed it. Takeover times are measured from the SIGKILL to the moment the ledger
names the standby as the role's leader, and printed as JSON.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest

from coordinator.ledger.leaders import leader_of
from coordinator.ledger.redis_server import EmbeddedRedis
from tests import procs
from tests.procs import free_port, wait_until
from tests.test_faults import check_ledger, dataset, token

pytestmark = pytest.mark.slow

LEADER_TTL = 4.0  # seconds: a standby takes over about this long after its leader dies


class Split:
    """One coordinator as several processes on one Redis and one data dir."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.data_dir = tmp / "coordinator"
        self.redis = EmbeddedRedis(tmp / "redis")
        self.url = self.redis.start()
        self.procs: dict[str, procs.Proc] = {}
        self.address = f"127.0.0.1:{free_port()}"
        self.start("gateway", "gateway", self.address)
        from coordinator.ledger import Ledger
        from coordinator.server import redis_client

        self.ledger = Ledger(redis_client(self.url))

    def start(self, name: str, role: str, address: str | None = None) -> procs.Proc:
        address = address or f"127.0.0.1:{free_port()}"
        proc = procs.coordinator(self.data_dir, address, self.tmp / f"{name}.log", "--role", role,
                                 "--redis-url", self.url, "--ray-address", "off", "--http", "off",
                                 "--leader-ttl", str(LEADER_TTL), "--fold-every", "2", "--lease-ttl", "30",
                                 "--public-address", self.address)
        proc.wait_for("volunteers join with" if role in ("all", "gateway") else "started", timeout=240)
        self.procs[name] = proc
        return proc

    def leader(self, role: str) -> str:
        """The name of the process leading ``role`` now ("" when none does)."""
        held = leader_of(self.ledger.r, role)
        if held is None:
            return ""
        pid = int(held[1].split("/")[1])
        return next((n for n, p in self.procs.items() if p.p.pid == pid), f"pid {pid}")

    def kill(self, name: str) -> float:
        """SIGKILL the process alone, as kill -9 or the OOM killer would; returns when (monotonic)."""
        self.procs[name].p.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        self.procs[name].p.wait()
        return killed

    def takeover(self, role: str, dead: str, killed: float) -> tuple[str, float]:
        """Who took ``role`` over from ``dead`` and how long after the kill."""
        new = wait_until(lambda: (n := self.leader(role)) and n != dead and n, 4 * LEADER_TTL + 30,
                         f"a standby to take over the {role}", every=0.05)
        return new, time.monotonic() - killed

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.p.poll() is None:
                proc.interrupt(timeout=30)
            if proc.p.poll() is None:
                procs.kill_tree(proc.p.pid)
        self.redis.stop()


def wait_for_line(proc: procs.Proc, pattern: str, after: int, timeout: float) -> int:
    """Wait until ``proc`` logs a line matching ``pattern`` past byte ``after`` of its log; returns
    where that line ends. Polled often: the moment it appears is the moment to kill."""
    end = time.monotonic() + timeout
    regex = re.compile(pattern)
    while time.monotonic() < end:
        text = proc.output()
        found = regex.search(text, after)
        if found:
            return found.end()
        if proc.p.poll() is not None:
            raise AssertionError(f"{proc.args[:4]} exited:\n{text[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"no line matching {pattern!r} in {timeout:.0f} s:\n{proc.output()[-3000:]}")


@pytest.fixture
def split(tmp_path: Path):
    made = Split(tmp_path)
    yield made
    made.close()


def test_the_folding_and_scheduling_leaders_killed_mid_work_are_replaced_and_the_job_finishes(split, tmp_path):
    split.start("first", "all")
    wait_until(lambda: split.leader("scheduler") == "first" and split.leader("folder") == "first", 60,
               "the first process to lead both roles")
    for name in ("second", "third"):  # standbys, up before the work starts: two kills to survive
        split.start(name, "all")
    assert split.leader("scheduler") == split.leader("folder") == "first"
    workers = [procs.outbound_worker(split.address, split.data_dir, tmp_path, name, card)
               for name, card in (("one", "RTX 3060:12"), ("two", "RTX 4090:24"))]
    try:
        for w in workers:
            w.wait_for("joined", timeout=180)
        from nomoat.client import CoordinatorClient
        from nomoat.v1 import nomoat_pb2 as pb

        with CoordinatorClient(split.address, token(split.data_dir, "admin")) as client:
            job_id = client.submit(dataset(tmp_path, 600), name="split",
                                   config=pb.JobConfig(tokens_per_task=1500)).job_id
        ledger = split.ledger
        total = len(ledger.tasks.ids(job_id))

        # 1. The folding leader, killed while it folds (it logs the fold's start, then evaluates).
        wait_for_line(split.procs["first"], r"folding \d+ adapters onto version", 0, 300)
        versions_at_kill = ledger.versions.latest()
        killed = split.kill("first")
        mid_fold = ledger.versions.latest() == versions_at_kill  # the fold it began was not published
        folder, fold_takeover = split.takeover("folder", "first", killed)
        scheduler, schedule_takeover_1 = split.takeover("scheduler", "first", killed)

        # 2. The scheduling leader now, killed in a round that is leasing tasks.
        leading = split.procs[scheduler]
        wait_for_line(leading, r"task \S+ of job \S+ leased", len(leading.output()), 300)
        killed = split.kill(scheduler)
        survivor = next(n for n in ("second", "third") if n != scheduler)
        new_scheduler, schedule_takeover = split.takeover("scheduler", scheduler, killed)
        assert new_scheduler == survivor
        if folder == scheduler:  # it led both: the folder moved too
            _, fold_takeover_2 = split.takeover("folder", scheduler, killed)
        else:
            fold_takeover_2 = None

        wait_until(lambda: (ledger.jobs.get(job_id).state.value in ("done", "failed")), 600, "the job", every=1)
        job = ledger.jobs.get(job_id)
        assert job.state.value == "done", job
        figures = check_ledger(ledger)
        tasks = ledger.tasks.of_job(job_id)
        assert all(t.state.value == "done" for t in tasks), [t for t in tasks if t.state.value != "done"]
        folded = [a.id for v in ledger.versions.all() if not v.operation for a in v.adapters]
        for task in tasks:  # every task's adapter folded exactly once (or refused by a gate)
            state = ledger.adapters.get(task.adapter).state.value
            assert (state == "folded" and folded.count(task.adapter) == 1) or state == "rejected", (task, state)
        print(json.dumps({"tasks": total, "leader_ttl_s": LEADER_TTL, "killed_mid_fold": mid_fold,
                          "fold_takeover_s": round(fold_takeover, 2),
                          "schedule_takeover_with_it_s": round(schedule_takeover_1, 2),
                          "schedule_takeover_s": round(schedule_takeover, 2),
                          "fold_takeover_with_it_s": fold_takeover_2 and round(fold_takeover_2, 2), **figures}))
    finally:
        for w in workers:
            w.interrupt(timeout=30)
