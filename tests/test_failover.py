"""Redis failover: a primary, two replicas and a Sentinel (the same redis-server binary, in
sentinel mode), the primary SIGKILLed.

A write that must survive a failover (a version published, an adapter accepted) is confirmed by
a replica (WAIT) before it counts as done; one no replica confirmed is reported as not done, so
a failover that undoes it undoes nothing anyone was told. With the whole coordinator on the
Sentinel URL, a job runs through the failover and finishes with no version lost and no adapter
folded twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from coordinator.ledger import Durability, FoldedAdapter, JobConfig, JobRecord, Ledger, NotDurable, TaskRecord, VersionRecord
from coordinator.ledger.connect import durability_for, redis_client
from coordinator.ledger.redis_server import redis_server_binary
from tests import consistency, procs
from tests.procs import free_port, wait_until

pytestmark = pytest.mark.slow

MASTER = "nomoat"
CONFIG = JobConfig(lora_rank=4, lora_alpha=8.0, target_modules=("q_proj",), seq_len=64, learning_rate=1e-3,
                   batch_size=2, epochs=1, tokens_per_task=100)


class Replicated:
    """A primary, two replicas and one Sentinel (quorum 1) on loopback, in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.binary = redis_server_binary()
        self.ports = [free_port() for _ in range(3)]
        self.procs: dict[int, subprocess.Popen] = {}
        for i, port in enumerate(self.ports):
            self._server(port, *(["--replicaof", "127.0.0.1", str(self.ports[0])] if i else []))
        self.sentinel_port = free_port()
        conf = folder / "sentinel.conf"
        conf.write_text(f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {folder}\n"
                        f"sentinel monitor {MASTER} 127.0.0.1 {self.ports[0]} 1\n"
                        f"sentinel down-after-milliseconds {MASTER} 1000\n"
                        f"sentinel failover-timeout {MASTER} 10000\n")
        self.sentinel = subprocess.Popen([self.binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.STDOUT)
        wait_until(lambda: self._replicas_known() == 2, 30, "the sentinel to see both replicas")
        self.url = f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{MASTER}"

    def _server(self, port: int, *args: str) -> None:
        data = self.folder / str(port)
        data.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--appendonly", "yes",
             "--save", "", *args], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_until(lambda: _pings(port), 20, f"redis-server on {port}")

    def _replicas_known(self) -> int:
        try:
            s = redis.Redis(port=self.sentinel_port)
            return sum(1 for r in s.sentinel_slaves(MASTER) if "s_down" not in r["flags"] and r["master-link-status"] == "ok")
        except redis.RedisError:
            return 0

    def primary_port(self) -> int:
        host, port = redis.Redis(port=self.sentinel_port).sentinel_get_master_addr_by_name(MASTER)
        return int(port)

    def replica_ports(self) -> list[int]:
        return [p for p in self.ports if p != self.primary_port() and self.procs[p].poll() is None]

    def kill_primary(self) -> int:
        port = self.primary_port()
        self.procs[port].send_signal(signal.SIGKILL)
        self.procs[port].wait()
        return port

    def wait_promoted(self, old: int) -> int:
        return wait_until(lambda: (p := self.primary_port()) != old and p, 60, "the sentinel to promote a replica")

    def close(self) -> None:
        for proc in [self.sentinel, *self.procs.values()]:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait()


def _pings(port: int) -> bool:
    try:
        return redis.Redis(port=port, socket_timeout=1).ping()
    except redis.RedisError:
        return False


@pytest.fixture
def replicated(tmp_path: Path):
    cluster = Replicated(tmp_path)
    yield cluster
    cluster.close()


def test_a_version_no_replica_confirmed_is_not_reported_and_a_confirmed_one_survives_the_failover(
        replicated: Replicated) -> None:
    assert durability_for(replicated.url) == Durability(replicas=1)
    ledger = Ledger(redis_client(replicated.url), Durability(replicas=1, timeout_ms=1000))
    ledger.versions.publish(VersionRecord(version=0, parent=-1))
    tasks = [TaskRecord(task_id=f"j-f-t{i}", job="j-f", index=i, tokens=10) for i in range(2)]
    ledger.jobs.create(JobRecord(job_id="j-f", name="f", config=CONFIG, total_tasks=2), tasks)
    fences = [ledger.leases.lease(t.task_id, time.time() + 600, 0, 3) for t in tasks]
    kept = ledger.adapters.accept("j-f-t0", fences[0], "a" * 64, tokens=10)
    assert kept.status == "accepted"  # confirmed by a replica: it must survive
    ledger.versions.publish(VersionRecord(version=1, parent=0, adapters=(FoldedAdapter(kept.detail, 1.0),)),
                            folded=[(kept.detail, 1.0)])

    replicas = replicated.replica_ports()
    for port in replicas:  # the replicas stop, and the primary drops them: nothing written now reaches them
        replicated.procs[port].send_signal(signal.SIGSTOP)
    redis.Redis(port=replicated.primary_port()).client_kill_filter(_type="replica")
    with pytest.raises(NotDurable, match="version 2 was written, but 0 of the 1 Redis replicas"):
        ledger.versions.publish(VersionRecord(version=2, parent=1))
    with pytest.raises(NotDurable, match="the adapter of task j-f-t1"):
        ledger.adapters.accept("j-f-t1", fences[1], "b" * 64, tokens=10)
    old = replicated.kill_primary()
    for port in replicas:
        replicated.procs[port].send_signal(signal.SIGCONT)
    replicated.wait_promoted(old)

    # What was confirmed is there; what was reported as not done is not (and nobody was told it was).
    assert ledger.versions.latest() == 1
    assert ledger.adapters.get(kept.detail).state.value == "folded"
    assert ledger.tasks.get("j-f-t1").state.value == "leased"  # its upload is retried, under the same lease
    wait_until(lambda: replicated._replicas_known() >= 1, 60, "the other replica to follow the new primary")
    retried = ledger.adapters.accept("j-f-t1", fences[1], "b" * 64, tokens=10)
    assert retried.status == "accepted"
    again = VersionRecord(version=2, parent=1, adapters=(FoldedAdapter(retried.detail, 1.0),))
    assert ledger.versions.publish(again, folded=[(retried.detail, 1.0)]).version == 2
    consistency.check(ledger)


def test_a_job_runs_through_a_failover_of_the_primary_with_no_version_lost_and_nothing_folded_twice(
        replicated: Replicated, tmp_path: Path) -> None:
    from tests.test_faults import check_ledger, dataset

    data_dir = tmp_path / "coordinator"
    address = f"127.0.0.1:{free_port()}"
    coordinator = procs.coordinator(data_dir, address, tmp_path / "coordinator.log", "--redis-url", replicated.url,
                                    "--fold-every", "2")
    worker = None
    try:
        coordinator.wait_for("volunteers join with", timeout=240)
        worker = procs.outbound_worker(address, data_dir, tmp_path, "one")
        worker.wait_for("joined", timeout=180)
        ledger = Ledger(redis_client(replicated.url))
        from nomoat.client import CoordinatorClient
        from nomoat.v1 import nomoat_pb2 as pb

        admin = (data_dir / "admin.token").read_text().strip()
        with CoordinatorClient(address, admin) as client:
            job_id = client.submit(dataset(tmp_path, 240), name="failover",
                                   config=pb.JobConfig(tokens_per_task=3000)).job_id
        wait_until(lambda: ledger.versions.latest() >= 1, 300, "a first fold", every=1)
        versions_before = ledger.versions.all()
        accepted = {t.adapter for t in ledger.tasks.of_job(job_id) if t.state.value == "done"}

        old = replicated.kill_primary()
        replicated.wait_promoted(old)

        def over() -> bool:
            job = ledger.jobs.get(job_id)
            return job is not None and job.state.value in ("done", "failed")

        wait_until(over, 400, "the job", every=1)
        assert ledger.jobs.get(job_id).state.value == "done", ledger.jobs.get(job_id)
        figures = check_ledger(ledger, versions_before)
        for adapter_id in accepted:  # accepted before the kill: still there, and accounted for
            assert ledger.adapters.get(adapter_id).state.value in ("folded", "rejected", "buffered")
        print(figures)
    finally:
        if worker is not None:
            worker.interrupt(timeout=30)
        coordinator.interrupt(timeout=60)
        for proc in [p for p in (worker, coordinator) if p is not None]:
            if proc.p.poll() is None:
                procs.kill_tree(proc.p.pid)
        procs.kill_leftovers(data_dir)
