"""Machines for tests across hosts, made of Linux network namespaces.

Each "host" is a network namespace of its own with one veth link to a shared router namespace;
every name is unique to the test run (``nm<run>-hub``), and every address is in
:data:`PRIVATE_RANGE`, which exists only inside these namespaces: nothing here touches the
machine's own interfaces, routes or firewall. A host is either *routed* (it reaches, and is
reached by, every other routed host, like machines on one VPN overlay) or *behind NAT*: the
router masquerades what it sends (like a home router), lets nothing in that is not an answer,
and lets it reach only the (host, port) pairs :meth:`Network.allow` names.

Everything is cleaned up on the way out, test failure or not: the processes left in each
namespace (they can only be this run's), the namespaces, and with them their links and the
router's nftables table.

Processes run inside a namespace with ``ip netns exec``; the test process itself reaches into
one through :class:`InNamespace`, a thread that has moved there (the sockets it opens live in
that namespace). Needs root, ``ip`` (iproute2) and ``nft`` (nftables); :func:`unavailable`
says which is missing, for a skip.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

# 10.231.N.0/24 per host link: .1 is the router's end, .2 the host's. Private (RFC 1918), and
# only ever configured inside this run's namespaces.
PRIVATE_RANGE = "10.231.0.0/16"
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000

T = TypeVar("T")


class NetnsError(RuntimeError):
    """A namespace, link or filter could not be set up; the message says which command failed."""


def sh(*argv: str, input: str | None = None, timeout: float = 30) -> str:
    """Run a set-up command; its stdout, or a NetnsError that quotes it and its stderr."""
    try:
        done = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"`{' '.join(argv)}` failed: {exc}") from None
    if done.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def unavailable() -> str | None:
    """Why these tests cannot run here (a sentence for pytest.skip), or None when they can."""
    if os.geteuid() != 0:
        return "tests across network namespaces need root (ip netns add); CI runs them as root"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian package {package}; `make test` installs it as root)"
    probe = f"nmprobe{os.getpid()}{secrets.token_hex(2)}"
    try:
        sh("ip", "netns", "add", probe)
    except NetnsError as exc:
        return f"`ip netns` is unavailable here (a container without CAP_SYS_ADMIN?): {exc}"
    try:
        sh("ip", "netns", "del", probe)
    except NetnsError:
        pass
    return None


def run_id() -> str:
    """A short tag that no other test run on this machine uses at the same time."""
    return f"{os.getpid() % 100000}{secrets.token_hex(2)}"


@dataclass
class Namespace:
    name: str

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this namespace (ip netns exec replaces itself with it)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def sh(self, *argv: str, input: str | None = None, timeout: float = 30) -> str:
        return sh(*self.argv(argv), input=input, timeout=timeout)

    def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(argv), env={**os.environ, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)

    def popen(self, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen:
        """A background process in this namespace, in a session of its own, writing to ``log``."""
        with open(log, "wb") as fh:
            return subprocess.Popen(self.argv(argv), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **(env or {})}, start_new_session=True)

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in sh("ip", "netns", "pids", self.name).split()]
        except NetnsError:
            return []

    def can_connect(self, host: str, port: int, timeout: float = 3.0) -> bool:
        """Whether a TCP connection from inside this namespace to host:port is accepted."""
        with InNamespace(self) as inside:
            return inside.call(_connects, host, port, timeout)


def _connects(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _enter(path: Path) -> None:
    """Move the calling thread (only it) into the network namespace at ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({path}) failed")
    finally:
        os.close(fd)


class InNamespace:
    """One thread of this process, moved into a namespace; what it runs connects from there.

    For pure-Python clients (redis-py, sockets), whose sockets are opened by the calling thread;
    not for gRPC, whose C core connects from threads of its own (run the CLI there instead).
    """

    def __init__(self, namespace: Namespace) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"netns-{namespace.name}",
                                        initializer=_enter, initargs=(namespace.path,))

    def call(self, fn: Callable[..., T], *args, timeout: float = 120) -> T:
        return self._pool.submit(fn, *args).result(timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> InNamespace:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def kill_all(namespace: Namespace) -> None:
    """SIGKILL every process still in ``namespace`` (all this run's: the namespace is its own)."""
    for _ in range(3):  # a process can start another while the first sweep runs
        pids = namespace.pids()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


@contextmanager
def namespace(name: str) -> Iterator[Namespace]:
    """A new network namespace with loopback up; on the way out, its processes and itself go."""
    sh("ip", "netns", "add", name)
    ns = Namespace(name)
    try:
        ns.sh("ip", "link", "set", "lo", "up")
        yield ns
    finally:
        kill_all(ns)
        try:
            sh("ip", "netns", "del", name)
        except NetnsError:
            pass


@dataclass
class Host:
    """A machine: a namespace whose ``eth0`` is a veth link to the router."""

    name: str
    ns: Namespace
    ip: str
    router_ip: str
    router_if: str  # the router's end of the link
    behind_nat: bool
    filtered: bool  # may open connections only where Network.allow says (always so behind NAT)

    def argv(self, argv: Sequence[str]) -> list[str]:
        return self.ns.argv(argv)

    def link(self, up: bool) -> None:
        """Plug or pull this host's cable (its eth0 goes down: nothing in or out, no reset sent)."""
        self.ns.sh("ip", "link", "set", "eth0", "up" if up else "down")
        if up:  # a link that comes back up has lost its routes
            self.ns.sh("ip", "route", "replace", "default", "via", self.router_ip)


@dataclass
class Network:
    """A router namespace and the hosts linked to it (see the module docstring)."""

    run: str
    router: Namespace
    stack: ExitStack
    hosts: dict[str, Host] = field(default_factory=dict)
    allowed: list[tuple[str, str, int]] = field(default_factory=list)  # (NAT'd host, ip, tcp port)

    def add(self, name: str, behind_nat: bool = False, filtered: bool = False) -> Host:
        """A host linked to the router: routed (``filtered``: reaching only what is allowed) or
        behind NAT (filtered, masqueraded, and unreachable from outside)."""
        ns = self.stack.enter_context(namespace(f"nm{self.run}-{name}"))
        n = len(self.hosts) + 1
        host = Host(name, ns, ip=f"10.231.{n}.2", router_ip=f"10.231.{n}.1", router_if=f"r{n}",
                    behind_nat=behind_nat, filtered=filtered or behind_nat)
        # Made inside the two namespaces: the machine's own namespace never sees these links.
        sh("ip", "link", "add", "eth0", "netns", ns.name, "type", "veth", "peer", "name", host.router_if,
           "netns", self.router.name)
        self.router.sh("ip", "addr", "add", f"{host.router_ip}/24", "dev", host.router_if)
        self.router.sh("ip", "link", "set", host.router_if, "up")
        ns.sh("ip", "addr", "add", f"{host.ip}/24", "dev", "eth0")
        ns.sh("ip", "link", "set", "eth0", "up")
        ns.sh("ip", "route", "add", "default", "via", host.router_ip)
        self.hosts[name] = host
        self._apply_filter()
        return host

    def allow(self, host: Host, to: Host, port: int) -> None:
        """Let a filtered host open TCP connections to ``to``'s ``port`` (besides those allowed before)."""
        assert host.filtered, f"{host.name} is not filtered; it reaches everything already"
        self.allowed.append((host.name, to.ip, port))
        self._apply_filter()

    def revoke(self, host: Host, to: Host, port: int) -> None:
        self.allowed.remove((host.name, to.ip, port))
        self._apply_filter()

    def filter_rules(self) -> str:
        """The router's whole nftables table, rebuilt from the hosts and allowances."""
        forward = ["ct state established,related accept"]
        postrouting = []
        for host in self.hosts.values():
            if not host.filtered:
                continue
            ports: dict[str, list[int]] = {}
            for name, ip, port in self.allowed:
                if name == host.name:
                    ports.setdefault(ip, []).append(port)
            for ip, allowed in ports.items():
                listed = ", ".join(str(p) for p in sorted(set(allowed)))
                forward.append(f'iifname "{host.router_if}" ip daddr {ip} tcp dport {{ {listed} }} accept')
            # Out: refused at once (a reset, not a silent drop) so that a check that it cannot
            # reach a port answers quickly.
            forward.append(f'iifname "{host.router_if}" ip protocol tcp reject with tcp reset')
            forward.append(f'iifname "{host.router_if}" drop')
            if not host.behind_nat:
                continue
            # In: nothing that is not an answer, as at home.
            forward.append(f'oifname "{host.router_if}" drop')
            subnet = host.ip.rsplit(".", 1)[0] + ".0/24"
            postrouting.append(f'ip saddr {subnet} oifname != "{host.router_if}" masquerade')
        return "\n".join([
            "table inet nomoat {",
            "  chain forward {", "    type filter hook forward priority 0; policy accept;",
            *(f"    {rule}" for rule in forward), "  }",
            "  chain postrouting {", "    type nat hook postrouting priority 100; policy accept;",
            *(f"    {rule}" for rule in postrouting), "  }",
            "}",
        ]) + "\n"

    def _apply_filter(self) -> None:
        # Delete-and-add in one nft transaction: the table is replaced atomically.
        flush = "table inet nomoat {}\ndelete table inet nomoat\n"
        self.router.sh("nft", "-f", "-", input=flush + self.filter_rules())


@contextmanager
def network() -> Iterator[Network]:
    """A router namespace that forwards between the hosts added to it; all gone on the way out."""
    with ExitStack() as stack:
        run = run_id()
        router = stack.enter_context(namespace(f"nm{run}-router"))
        router.sh("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")  # this namespace's own setting
        yield Network(run, router, stack)


# -- processes inside a host ------------------------------------------------------------------


class HostProc:
    """A command running on a host, its output in a log file; stopped with SIGINT, then killed."""

    def __init__(self, host: Host, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None) -> None:
        self.host, self.argv, self.log = host, list(argv), log
        self.p = host.ns.popen(argv, log, env)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while text not in self.output():
            if self.p.poll() is not None:
                raise AssertionError(f"{self.argv[:4]} on {self.host.name} exited ({self.p.returncode}):\n"
                                     f"{self.output()[-3000:]}")
            if time.monotonic() > end:
                raise AssertionError(f"{self.argv[:4]} on {self.host.name} did not print {text!r} in "
                                     f"{timeout:.0f} s:\n{self.output()[-3000:]}")
            time.sleep(0.3)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int | None:
        """Ask it to stop as a user would; kill its whole session if it does not."""
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.p.wait()
        return self.p.returncode
