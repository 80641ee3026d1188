"""A job across real network namespaces: the hub, a trusted Ray worker, an outbound one behind NAT.

Hosts (tests/netns.py), each a network namespace linked to one router:

* ``hub``: Redis (with a password, on the hub's address), a Ray head with every port pinned
  (:data:`HEAD_PORTS`, the ones docs/deploy-network.md lists) and the coordinator, joined to
  that head with its token, gRPC on :data:`GRPC_PORT`.
* ``trusted``: routed to the hub (a machine on the same VPN overlay), filtered so that it
  reaches the hub only on the coordinator's port and the head's pinned ports: the job working
  proves that list is enough. It joins with ``nomoat worker start`` as a Ray node.
* ``home``: behind NAT (masquerade with nftables), reaching the coordinator's gRPC port and
  nothing else; its outbound-only worker (``nomoat worker start --coordinator HOST:PORT --token
  T``, no Ray) gets tasks over gRPC.

The outbound mode and the trusted-worker role come with ``nomoat worker start --ray``; on a
build without them the tests that need them skip, saying so (:func:`outbound_missing`).
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.ledger.redis_server import redis_server_binary
from nomoat.demo import DEMO_DATA
from nomoat.raynode import auth_env
from tests import netns
from tests.netns import Host, HostProc, InNamespace, Network
from tests.procs import NOMOAT, wait_until

pytestmark = pytest.mark.slow

GRPC_PORT = 50051
REDIS_PORT = 6380
# The Ray head's ports, every one pinned (a fresh namespace has them all free). Those a Ray
# node on another machine connects to: GCS, the head's raylet and object manager, and the
# range its workers and drivers (the coordinator is one) listen on. The rest stay on the head
# but are pinned too, so that nothing there is a random port a firewall would have to guess.
HEAD_PORTS = {
    "--port": 6379,  # GCS: where every node joins
    "--node-manager-port": 6382,  # the head's raylet
    "--object-manager-port": 6383,
    "--min-worker-port": 11000,  # workers' and drivers' own gRPC servers...
    "--max-worker-port": 11063,  # ...one port each
    "--ray-client-server-port": 10001,
    "--dashboard-agent-grpc-port": 6384,
    "--dashboard-agent-listen-port": 6385,
    "--metrics-export-port": 6386,
    "--runtime-env-agent-port": 6387,
}
# What a Ray node elsewhere must reach on the head (the trusted host's filter lets only these through).
HEAD_REACHED = (6379, 6382, 6383, *range(11000, 11064))
CARD = "RTX 3060:12"


def outbound_missing() -> str | None:
    """Why this build cannot run an outbound worker (a skip reason), or None when it can.

    The outbound mode comes with `--ray` on `nomoat worker start` (trusted Ray mode) and a
    `trusted-worker` token role; before them, `worker start` is Ray mode for every token.
    """
    shown = subprocess.run([*NOMOAT, "worker", "start", "--help"], capture_output=True, text=True, timeout=120).stdout
    if not re.search(r"--ray(?![-\w])", shown):
        return "this build's `nomoat worker start` has no --ray (trusted Ray mode), so no outbound-only mode to test"
    from coordinator.ledger import ROLES

    if "trusted-worker" not in ROLES:
        return "this build has no trusted-worker token role"
    return None


def worker_argv(address: str, name: str, cache: Path, *, ray: bool, outbound_cli: bool,
                node_ip: str = "") -> list[str]:
    """`nomoat worker start` for one volunteer, as this build spells it.

    ``ray``: a trusted Ray node (``--ray`` where the build has outbound mode, the only mode
    before it); else outbound-only (no Ray, no port opened). The token goes in NOMOAT_TOKEN.
    """
    argv = [*NOMOAT, "worker", "start", "--coordinator", address, "--simulate-gpu", CARD, "--threads", "1",
            "--name", name, "--cache-dir", str(cache)]
    if ray:
        return argv + (["--ray"] if outbound_cli else []) + (["--node-ip", node_ip] if node_ip else [])
    assert outbound_cli, "an outbound-only worker needs a build with outbound mode"
    return argv


def dataset(tmp: Path, lines: int, seed: int) -> Path:
    rows = DEMO_DATA.read_text(encoding="utf-8").splitlines()
    random.Random(seed).shuffle(rows)
    path = tmp / f"data-{seed}.jsonl"
    path.write_text("\n".join(rows[:lines]) + "\n", encoding="utf-8")
    return path


@dataclass
class Hub:
    """The hub host's services, and the test's handles on them."""

    net: Network
    host: Host
    tmp: Path
    data_dir: Path
    redis_url: str
    inside: InNamespace  # this process's thread in the hub: reads the ledger over Redis
    outbound_cli: bool

    @property
    def address(self) -> str:
        return f"{self.host.ip}:{GRPC_PORT}"

    def token(self, role: str) -> str:
        return (self.data_dir / f"{role}.token").read_text().strip()

    def cli(self, *args: str, token: str | None = None, timeout: float = 120) -> str:
        """A `nomoat` command run on the hub against its coordinator; its stdout."""
        done = self.host.ns.run([*NOMOAT, *args, "--coordinator", self.address, "--token", token or self.token("admin")],
                                timeout=timeout)
        assert done.returncode == 0, f"nomoat {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    def ledger(self, fn, *args):
        """``fn(ledger, *args)`` on the coordinator's ledger, connected from inside the hub."""
        return self.inside.call(_with_ledger, self.redis_url, fn, *args)

    def submit(self, lines: int, tokens_per_task: int, seed: int) -> str:
        out = self.cli("submit", str(dataset(self.tmp, lines, seed)), "--name", f"netns-{seed}",
                       "--tokens-per-task", str(tokens_per_task))
        return out.strip().splitlines()[-1]

    def job_state(self, job_id: str) -> str:
        return self.ledger(lambda ledger: ledger.jobs.get(job_id).state.value)

    def wait_job(self, job_id: str, timeout: float) -> str:
        wait_until(lambda: self.job_state(job_id) in ("done", "failed"), timeout, f"job {job_id} to finish", every=1)
        return self.job_state(job_id)


_LEDGERS: dict[str, object] = {}


def _with_ledger(url: str, fn, *args):
    from coordinator.ledger import Ledger
    from coordinator.server import redis_client

    if url not in _LEDGERS:  # one client per URL, made (and connecting) in the hub's thread
        _LEDGERS[url] = Ledger(redis_client(url))
    return fn(_LEDGERS[url], *args)


def start_head(host: Host, token: str, tmp: Path, temp_dirs: list[Path], keep: set[int], tries: int = 3) -> HostProc:
    """The operator's Ray head on ``host``: every port pinned, token authentication on.

    Ray gives its own raylet a fixed 30 s to register with the GCS and gives up otherwise; on a
    machine loaded that heavily (CI, several test runs at once) the start is tried again, after
    what the failed one left on the host (everything there but ``keep``) is gone.
    """
    for attempt in range(1, tries + 1):
        temp_dir = Path(tempfile.mkdtemp(prefix="nmray-"))  # short: Ray's unix socket paths
        temp_dirs.append(temp_dir)
        head = HostProc(host, [sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
                               f"--node-ip-address={host.ip}", "--num-cpus=0", "--include-dashboard=false",
                               f"--temp-dir={temp_dir}", f"--object-store-memory={200 << 20}",
                               *(f"{flag}={port}" for flag, port in HEAD_PORTS.items()),
                               "--block", "--disable-usage-stats"],
                        tmp / f"ray-head-{attempt}.log", env=auth_env(token))
        try:
            head.wait_for("--block", 120)
            return head
        except AssertionError as exc:
            head.stop(timeout=10)
            for pid in set(host.ns.pids()) - keep:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if attempt == tries or "timed out during startup" not in str(exc):
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Iterator[Hub]:
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("netns")
    outbound_cli = outbound_missing() is None
    with netns.network() as net:
        host = net.add("hub")
        password = secrets.token_hex(12)
        redis = HostProc(host, [redis_server_binary(), "--port", str(REDIS_PORT), "--bind", host.ip, "127.0.0.1",
                                "--requirepass", password, "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                         tmp / "redis.log")
        redis.wait_for("Ready to accept connections", 30)
        ray_token = secrets.token_hex(32)
        token_file = tmp / "ray.token"
        token_file.write_text(ray_token + "\n")
        inside = InNamespace(host.ns)
        coordinator = head = None
        temp_dirs: list[Path] = []
        try:
            head = start_head(host, ray_token, tmp, temp_dirs, keep={redis.p.pid})
            data_dir = tmp / "coordinator"
            coordinator = HostProc(host, [*NOMOAT, "coordinator", "start", "--data-dir", str(data_dir),
                                          "--listen", f"{host.ip}:{GRPC_PORT}", "--public-address",
                                          f"{host.ip}:{GRPC_PORT}", "--redis-url",
                                          f"redis://:{password}@{host.ip}:{REDIS_PORT}/0",
                                          "--ray-address", f"{host.ip}:{HEAD_PORTS['--port']}",
                                          "--ray-token-file", str(token_file), "--lease-ttl", "6",
                                          "--fold-every", "2", "--fold-timeout", "5"],
                                   tmp / "coordinator.log")
            coordinator.wait_for("volunteers join with", 240)
            # It listens beyond loopback, so it serves TLS by its own CA (coordinator.gateway.tls):
            # every client here pins that CA by the fingerprint its join line prints.
            pinned = {"NOMOAT_CA_FINGERPRINT": fingerprint_in(coordinator.output()),
                      "NOMOAT_CONFIG_DIR": str(tmp / "config")}
            os.environ.update(pinned)  # the hosts' processes inherit this process's environment
            yield Hub(net, host, tmp, data_dir, f"redis://:{password}@{host.ip}:{REDIS_PORT}/0", inside,
                      outbound_cli)
        finally:
            for name in ("NOMOAT_CA_FINGERPRINT", "NOMOAT_CONFIG_DIR"):
                os.environ.pop(name, None)
            for proc in (coordinator, head, redis):
                if proc is not None:
                    proc.stop(timeout=60)
            inside.close()
            for folder in temp_dirs:
                shutil.rmtree(folder, ignore_errors=True)


def fingerprint_in(output: str) -> str:
    """The CA fingerprint a coordinator's join line names ("" when it serves plain gRPC)."""
    found = re.search(r"--ca-fingerprint (sha256:[0-9a-f]{64})", output)
    return found.group(1) if found else ""


@dataclass
class Volunteer:
    host: Host
    proc: HostProc
    name: str

    def worker_id(self, hub: Hub) -> str:
        return hub.ledger(lambda ledger: next(w.worker_id for w in ledger.workers.all() if w.name == self.name))


@contextmanager
def trusted_volunteer(hub: Hub, name: str) -> Iterator[Volunteer]:
    """A trusted machine on the hub's overlay: reaches the coordinator and the head's pinned ports only."""
    host = hub.net.add(name, filtered=True)
    for port in (GRPC_PORT, *HEAD_REACHED):
        hub.net.allow(host, hub.host, port)
    token = (hub.cli("token", "create", "--role", "trusted-worker", "--name", name).strip().splitlines()[-1]
             if hub.outbound_cli else hub.token("worker"))
    argv = worker_argv(hub.address, name, hub.tmp / f"cache-{name}", ray=True, outbound_cli=hub.outbound_cli,
                       node_ip=host.ip)
    proc = HostProc(host, argv, hub.tmp / f"{name}.log", env={"NOMOAT_TOKEN": token})
    try:
        proc.wait_for("joined", 240)
        yield Volunteer(host, proc, name)
    finally:
        host.link(True)
        proc.stop(timeout=60)


@pytest.fixture(scope="module")
def trusted(hub: Hub) -> Iterator[Volunteer]:
    with trusted_volunteer(hub, "trusted") as volunteer:
        yield volunteer


@pytest.fixture(scope="module")
def home(hub: Hub) -> Host:
    """A machine behind a home router: NAT, and nothing reachable but the coordinator's port."""
    host = hub.net.add("home", behind_nat=True)
    hub.net.allow(host, hub.host, GRPC_PORT)
    return host


# -- what the ledger says ---------------------------------------------------------------------


def task_report(ledger, job_id: str) -> dict[str, dict]:
    """Per task of the job: its state, fence, attempts, how many of its adapters were accepted
    and folded (a speculative twin's count as its original's), and who made the one it kept."""
    tasks = {t.task_id: t for t in ledger.tasks.of_job(job_id)}
    names = {w.worker_id: w.name for w in ledger.workers.all()}
    root = {task_id: task_id for task_id in tasks}
    for task in list(tasks.values()):
        if task.twin:
            root[task.twin] = task.task_id
    folded = [a.id for v in ledger.versions.all() if not v.operation for a in v.adapters]
    report = {task_id: {"state": t.state.value, "fence": t.fence, "attempts": t.attempts, "accepted": 0,
                        "folded": 0, "by": ""} for task_id, t in tasks.items()}
    for adapter_id in ledger.adapters.ids():
        adapter = ledger.adapters.get(adapter_id)
        if adapter.task not in root:
            continue
        entry = report[root[adapter.task]]
        entry["accepted"] += 1
        entry["folded"] += folded.count(adapter_id)
        if adapter_id == tasks[root[adapter.task]].adapter:
            entry["by"] = names.get(adapter.worker, adapter.worker)
    return report


def tasks_by(report: dict[str, dict]) -> dict[str, int]:
    """Worker name -> how many of the job's kept adapters it made."""
    counts: dict[str, int] = {}
    for entry in report.values():
        counts[entry["by"]] = counts.get(entry["by"], 0) + 1
    return counts


def assert_each_task_once(report: dict[str, dict]) -> None:
    """Every task done, with one adapter kept; none folded twice, none of a task folded twice."""
    for task_id, entry in report.items():
        assert entry["state"] == "done", (task_id, entry)
        assert entry["accepted"] == 1, (task_id, entry)  # one upload taken per task (twins: the first)
        assert entry["folded"] <= 1, (task_id, entry)


def ledger_checks(ledger) -> dict[str, int]:
    from tests.test_faults import check_ledger  # nothing lost, nothing folded twice, invariants

    return check_ledger(ledger)


def run_job(hub: Hub, lines: int, tokens_per_task: int, seed: int, timeout: float = 300) -> tuple[str, float, dict]:
    started = time.monotonic()
    job_id = hub.submit(lines, tokens_per_task, seed)
    state = hub.wait_job(job_id, timeout)
    took = time.monotonic() - started
    report = hub.ledger(task_report, job_id)
    assert state == "done", (state, report)
    return job_id, took, report


# -- the network itself -----------------------------------------------------------------------

PROBE_PORT = 50099


def listening_ports(host: Host) -> set[int]:
    """The TCP ports something listens on at the host's own address (or on all of them)."""
    ports = set()
    for line in host.ns.sh("ss", "-ltnH").splitlines():
        address, _, port = line.split()[3].rpartition(":")
        if address.strip("[]").removeprefix("::ffff:") not in ("127.0.0.1", "::1"):
            ports.add(int(port))
    return ports


def _listen(ip: str, port: int):
    sock = socket.create_server((ip, port))
    sock.settimeout(10)
    return sock


def test_behind_nat_only_the_coordinators_port_is_reachable(hub: Hub, home: Host, trusted: Volunteer) -> None:
    """Each refusal has a control: the trusted host reaches the same port, so the filter refused it."""
    hub_ip = hub.host.ip
    assert home.ns.can_connect(hub_ip, GRPC_PORT)
    for port, what in ((REDIS_PORT, "Redis"), (HEAD_PORTS["--port"], "the Ray GCS"),
                       (HEAD_PORTS["--node-manager-port"], "the head's raylet"),
                       (HEAD_PORTS["--object-manager-port"], "the head's object manager")):
        if port != REDIS_PORT:
            assert trusted.host.ns.can_connect(hub_ip, port), f"{what} on {hub_ip}:{port} is not listening"
        assert not home.ns.can_connect(hub_ip, port), f"the NAT'd host reached {what} on {hub_ip}:{port}"
    # Every port that listens on the hub (Ray's own processes open some at random, on every
    # interface), tried from both: the NAT'd host reaches the coordinator alone, the trusted
    # one the coordinator and the head's pinned ports alone.
    listening = listening_ports(hub.host)
    assert {GRPC_PORT, REDIS_PORT, HEAD_PORTS["--port"]} <= listening, listening
    from_home = {port for port in listening if home.ns.can_connect(hub_ip, port)}
    assert from_home == {GRPC_PORT}, f"the NAT'd host reached {sorted(from_home)} of {sorted(listening)}"
    from_trusted = {port for port in listening if trusted.host.ns.can_connect(hub_ip, port)}
    assert GRPC_PORT in from_trusted and from_trusted <= {GRPC_PORT, *HEAD_REACHED}, sorted(from_trusted)
    # Redis listens on the hub's address (the hub itself reaches it there), yet neither
    # volunteer may: it is not among the ports the trusted host's filter lets through either.
    assert hub.host.ns.can_connect(hub_ip, REDIS_PORT)
    assert not trusted.host.ns.can_connect(hub_ip, REDIS_PORT)
    # Nothing gets in to the NAT'd host...
    listener = InNamespace(home.ns)
    try:
        probe = listener.call(_listen, home.ip, PROBE_PORT)
        assert home.ns.can_connect(home.ip, PROBE_PORT)  # it listens (its own loopback of eth0)...
        assert not hub.host.ns.can_connect(home.ip, PROBE_PORT, timeout=2)  # ...but the hub cannot get in
        probe.close()
    finally:
        listener.close()
    # ...and what it sends comes from the router (masqueraded), through a port
    # allowed for this check only.
    hub.net.allow(home, hub.host, PROBE_PORT)
    try:
        probe = hub.inside.call(_listen, hub_ip, PROBE_PORT)
        assert home.ns.can_connect(hub_ip, PROBE_PORT)
        conn, (peer, _) = probe.accept()
        conn.close()
        probe.close()
        # Masquerading gives it the address of the router's side that faces the hub.
        assert peer == hub.host.router_ip != home.ip, f"the hub saw {peer}, not the router's {hub.host.router_ip}"
    finally:
        hub.net.revoke(home, hub.host, PROBE_PORT)
    assert not home.ns.can_connect(hub_ip, PROBE_PORT)


# -- jobs across hosts ------------------------------------------------------------------------


def test_a_job_across_namespaces_on_a_trusted_ray_worker(hub: Hub, trusted: Volunteer) -> None:
    """The head's pinned ports are all a Ray node elsewhere needs (its filter allows only them)."""
    job_id, took, report = run_job(hub, lines=60, tokens_per_task=1024, seed=1)
    assert_each_task_once(report)
    assert {e["by"] for e in report.values()} == {"trusted"}, report
    figures = hub.ledger(ledger_checks)
    print(json.dumps({"netns_ray_job_s": round(took, 1), "tasks": len(report), **figures}))


def cut_link_mid_task(hub: Hub, candidates: list[Volunteer], seed: int, lines: int = 160,
                      tokens_per_task: int = 3000) -> dict:
    """A job; the cable of the first candidate seen training one of its tasks is pulled, and
    plugged back once that task is re-issued. The job completes with every task done once, and
    the victim's late upload under the old lease (if it makes one) is not taken."""
    ids = {volunteer.worker_id(hub): volunteer for volunteer in candidates}
    job_id = hub.submit(lines, tokens_per_task, seed)

    def training_on_a_candidate():
        return hub.ledger(lambda ledger: [(t.task_id, t.fence, t.holder_worker) for t in ledger.tasks.of_job(job_id)
                                          if t.state.value == "leased" and t.holder_worker in ids
                                          and t.claimed == t.fence])

    names = " or ".join(v.name for v in candidates)
    try:
        ((task, fence, holder), *_) = wait_until(training_on_a_candidate, 240, f"a task training on {names}",
                                                  every=0.2)
    except AssertionError as exc:
        held = hub.ledger(lambda ledger: [(t.task_id, t.state.value, t.holder_worker, t.fence, t.claimed)
                                          for t in ledger.tasks.of_job(job_id)])
        raise AssertionError(f"{exc}; their ids: {sorted(ids)}; the job's tasks: {held}") from None
    victim = ids[holder]
    victim.host.link(False)
    cut_at = time.monotonic()
    wait_until(lambda: hub.ledger(lambda ledger: ledger.tasks.get(task).fence > fence), 120,
               f"task {task} to be re-issued after {victim.name}'s link went down")
    reissue_s = time.monotonic() - cut_at
    victim.host.link(True)
    assert hub.wait_job(job_id, 400) == "done"
    report = hub.ledger(task_report, job_id)
    assert_each_task_once(report)
    # Re-issued under a new fence. (The cut-off lease expiring spends no attempt: it costs its
    # volunteer trust instead, issue 19.)
    assert report[task]["fence"] > fence, report[task]
    return {"cut": victim.name, "reissued_after_link_down_s": round(reissue_s, 1), "tasks": len(report),
            "by": tasks_by(report),
            **hub.ledger(ledger_checks)}


@pytest.fixture
def spare(hub: Hub, trusted: Volunteer) -> Iterator[Volunteer]:
    """A second trusted machine, for one test: a fresh card of unknown speed gets one task per
    run, so it does not change how later tests' jobs are shared out."""
    with trusted_volunteer(hub, "spare") as volunteer:
        yield volunteer


def test_a_ray_worker_cut_off_mid_task_is_replaced(hub: Hub, trusted: Volunteer, spare: Volunteer) -> None:
    figures = cut_link_mid_task(hub, [trusted, spare], seed=4)
    print(json.dumps({"netns_ray_link_cut": figures}))


@pytest.fixture(scope="module")
def outbound(hub: Hub, home: Host) -> Iterator[Volunteer]:
    reason = outbound_missing()
    if reason:
        pytest.skip(reason)
    argv = worker_argv(hub.address, "home", hub.tmp / "cache-home", ray=False, outbound_cli=True)
    proc = HostProc(home, argv, hub.tmp / "home.log", env={"NOMOAT_TOKEN": hub.token("worker")})
    volunteer = Volunteer(home, proc, "home")
    try:
        # Its own wording of "joined" is the outbound mode's; the ledger says it registered.
        def registered() -> bool:
            if proc.p.poll() is not None:
                raise AssertionError(f"the outbound worker exited ({proc.p.returncode}):\n{proc.output()[-3000:]}")
            return hub.ledger(lambda ledger: any(w.name == "home" for w in ledger.workers.all()))

        wait_until(registered, 240, "the outbound worker to register")
        yield volunteer
    finally:
        home.link(True)
        proc.stop(timeout=60)


def test_a_job_across_ray_and_outbound_workers_and_a_cut_link(hub: Hub, trusted: Volunteer,
                                                              outbound: Volunteer) -> None:
    # One job, both kinds of worker. The scheduler gives the fastest card a run of up to
    # max_units_per_run (16) tasks, a card of unknown speed one: with more tasks than that, each
    # kind gets some, whatever earlier jobs measured.
    _, took, report = run_job(hub, lines=200, tokens_per_task=512, seed=2)
    assert len(report) > 16, f"the job should have more than 16 tasks: {len(report)}"
    assert_each_task_once(report)
    by = {e["by"] for e in report.values()}
    assert "home" in by and by & {"trusted", "spare"}, f"both kinds of worker should have done tasks: {report}"

    print(json.dumps({"netns_mixed_job_s": round(took, 1), "tasks": len(report), "by": tasks_by(report)}))
    # A second job; the NAT'd worker's cable is pulled while it trains one of its tasks.
    # Tasks long enough (1500 tokens) that the NAT'd worker is seen mid-task even on a quiet
    # machine (at 512 tokens it finished its share between two looks at the ledger), and more of
    # them than one run of the fast card holds, so that the NAT'd worker gets some.
    figures = cut_link_mid_task(hub, [outbound], seed=3, lines=800, tokens_per_task=1500)
    print(json.dumps({"netns_outbound_link_cut": figures}))
