"""Ray nodes, as both sides start and name them.

What a nomoat node advertises (the resource names and labels the coordinator's tasks ask for),
the node itself as a child process (``ray start --block``, stopped with SIGTERM), and the Ray
cluster token: the coordinator's own for a head it starts, the operator's for a cluster it joins.

``ray stop`` would stop every Ray process on the machine, including other volunteers' nodes
and the head; a blocking ``ray start`` stops exactly its own node when terminated, which is
what lets several workers (and a coordinator) share one machine.

On Linux the node also shares its starter's fate: if the worker or coordinator process is
killed outright (SIGKILL, OOM killer), the kernel kills ``ray start``, whose own processes
(raylet, GCS) Ray binds to it the same way. Ray's agents can outlive a raylet that died like
that; :meth:`RayNode.stop` and :func:`stop_leftovers` (run by the next coordinator) end them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

# Before Ray starts: ask the kernel to SIGKILL this process when its starter dies (Linux; a
# no-op elsewhere), and give up if the starter is already gone. Done in the child itself
# rather than in a preexec_fn, which is not safe in a process that runs gRPC threads.
_BOOT = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != int(os.environ.get("NOMOAT_PARENT_PID") or os.getppid()):
    sys.exit("the process that started this Ray node is gone")
from ray.scripts.scripts import main
main()
"""
RAY_CLI = [sys.executable, "-c", _BOOT, "start"]

# Ray custom resource that only nomoat workers advertise: every nomoat task asks for it, so
# training never lands on the coordinator's head node or on someone else's Ray nodes.
WORKER_RESOURCE = "nomoat_worker"
VRAM_RESOURCE = "vram_gb"
LABEL_PREFIX = "nomoat/"
# The worker a node belongs to (its ledger id): how the scheduler knows whose card a run lands on.
WORKER_ID_LABEL = LABEL_PREFIX + "worker-id"
# "true" on a node whose card loads a 4-bit base (Card.loads_4bit): the scheduler may place there
# a task that fits the card only in 4 bits, and asks Ray for the 4-bit plan's VRAM.
LOADS_4BIT_LABEL = LABEL_PREFIX + "loads-4bit"


class RayNodeError(RuntimeError):
    """The Ray node did not start; the message says why and where its log is."""


class RayNode:
    def __init__(self, args: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.args = args
        self.env = {**os.environ, **env}
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*RAY_CLI, *self.args, "--block", "--disable-usage-stats"],
            env={**self.env, "NOMOAT_PARENT_PID": str(os.getpid())},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C goes to us; we stop the node in order
        )
        log.close()
        end = time.monotonic() + timeout
        while b"--block" not in self.log_path.read_bytes():  # printed once the node is up
            if self.proc.poll() is not None:
                raise RayNodeError(f"the Ray node exited (code {self.proc.returncode}); see {self.log_path}:\n"
                                   + self.log_path.read_text(errors="replace")[-1500:])
            if time.monotonic() > end:
                self.stop()
                raise RayNodeError(f"the Ray node did not start within {timeout:.0f} s; see {self.log_path}")
            time.sleep(0.2)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # The node's session is its own: whatever is still in it (Ray's agents outlive a raylet
        # that died abnormally) belongs to this node and goes too.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()


def auth_env(token: str) -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


def use_ray_token(token: str) -> None:
    """Make this process (a Ray driver) authenticate with ``token``.

    Ray reads its auth settings when first imported; if that already happened, make it read
    them again (Ray's own test helpers do the same), or the driver keeps the old token.
    """
    os.environ.update(auth_env(token))
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    if "ray._raylet" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


class RayClusterError(RuntimeError):
    """An existing Ray cluster cannot be used; the message says why and what to do."""


# Where Ray itself looks for a cluster's token, in its order: `ray start --head` on a machine
# without one writes a new one to the default file (`ray get-auth-token` prints it).
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"


def operator_token(token_file: str | Path | None = None, env: Mapping[str, str] | None = None) -> str:
    """The token of a Ray cluster the operator started: ``token_file`` if given, else where Ray
    looks (``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` names, ``~/.ray/auth_token``)."""
    env = os.environ if env is None else env
    if token_file:
        path = Path(token_file).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise RayClusterError(f"cannot read the Ray token file {path}: {exc.strerror}") from None
        if not token:
            raise RayClusterError(f"the Ray token file {path} is empty; put the cluster's token in it "
                                  "(`ray get-auth-token` on the head prints it)")
        return token
    if env.get(TOKEN_ENV, "").strip():
        return env[TOKEN_ENV].strip()
    home = Path(env.get("HOME") or Path.home())
    for path in (env.get(TOKEN_PATH_ENV), home / ".ray" / "auth_token"):
        if path and Path(path).expanduser().is_file():
            token = Path(path).expanduser().read_text().strip()
            if token:
                return token
    raise RayClusterError(
        "no token for the Ray cluster was found: pass the file that holds it with --ray-token-file, "
        f"or set {TOKEN_ENV} (`ray get-auth-token` on the head prints it)")


def check_token(address: str, token: str, timeout: float = 10.0) -> None:
    """Ask the cluster's GCS whether it accepts ``token``; raise a sentence if not.

    ``ray.init`` with a wrong token retries for a long while and then reports a connection
    failure; one call to the GCS answers at once and tells the two apart.
    """
    import grpc

    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")
        try:
            call(b"", timeout=timeout, metadata=[("authorization", f"Bearer {token}")])
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise RayClusterError(
                    f"the Ray cluster at {address} refused the token: it is not the token the cluster was "
                    f"started with. Pass the cluster's own token with --ray-token-file or {TOKEN_ENV} "
                    "(`ray get-auth-token` on the head prints it)") from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise RayClusterError(f"cannot reach the Ray cluster at {address} (is its head running, "
                                      "and is the address HEAD_IP:GCS_PORT?)") from None
            # Anything else (a Ray that renamed this call, say) is left for ray.init to judge.


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def head_node(node_ip: str, port: int, token: str, temp_dir: Path, log_path: Path) -> tuple[RayNode, str]:
    """A head node that runs no nomoat tasks (0 CPUs) and keeps its dashboard on loopback."""
    port = port or free_port(node_ip)
    args = [
        "--head", f"--port={port}", f"--node-ip-address={node_ip}", "--num-cpus=0",
        "--include-dashboard=false", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={free_port(node_ip)}",
        f"--object-store-memory={200 << 20}",  # task inputs and results are small; data goes over gRPC
    ]
    return RayNode(args, auth_env(token), log_path), f"{node_ip}:{port}"


def worker_node(
    address: str,
    token: str,
    resources: Mapping[str, float],
    labels: Mapping[str, str],
    log_path: Path,
    env: Mapping[str, str] = (),
    num_cpus: int = 1,
    node_ip: str | None = None,
    object_store_bytes: int = 200 << 20,
) -> RayNode:
    args = [
        f"--address={address}",
        f"--resources={json.dumps(dict(resources))}",
        f"--num-cpus={num_cpus}",
        f"--object-store-memory={object_store_bytes}",
    ]
    if labels:
        args.append("--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()))
    if node_ip:
        args.append(f"--node-ip-address={node_ip}")
    return RayNode(args, {**auth_env(token), **dict(env)}, log_path)


def _holds_file_under(pid: int, folder: str) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(folder) for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def stop_leftovers(record: Path) -> int:
    """Kill what is left of a node recorded by :func:`remember` whose starter was killed; how many.

    Ray's raylet and GCS die with ``ray start`` (fate-shared), but helpers they started (the
    dashboard and runtime-env agents) can linger for good. They are in the node's process
    group and hold files in its temp dir; nothing else is touched.
    """
    try:
        saved = json.loads(Path(record).read_text())
        pgid, temp_dir = int(saved["pgid"]), str(saved["temp_dir"])
    except (OSError, ValueError, KeyError):
        return 0
    victims = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            pid = int(entry.name)
            try:
                if os.getpgid(pid) == pgid and _holds_file_under(pid, temp_dir):
                    victims.append(pid)
            except OSError:
                continue
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    Path(record).unlink(missing_ok=True)
    # Its session files too, if the record points where head nodes' temp dirs are made.
    temp = Path(temp_dir)
    if temp.name.startswith("nomoat-ray-") and temp.parent == Path(tempfile.gettempdir()):
        shutil.rmtree(temp, ignore_errors=True)
    return len(victims)


def remember(node: RayNode, temp_dir: Path, record: Path) -> None:
    """Note a started node's process group and temp dir, for :func:`stop_leftovers` after a crash."""
    Path(record).write_text(json.dumps({"pgid": node.proc.pid, "temp_dir": str(temp_dir)}))
