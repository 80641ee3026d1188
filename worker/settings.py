"""What only the volunteer's own node knows, read once where a task starts.

Everything the coordinator can say travels in the task spec (``nomoat.spec.TaskSpec``). The rest
is node-local: the volunteer's own token and the CA it checks the coordinator's certificate
with, where its cache is, how many CPU threads a task may use, and the test hooks. The agent
puts them in its Ray node's environment (:meth:`NodeSettings.env`); a task reads them back once
(:meth:`NodeSettings.from_env`) and passes the object down.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from worker.cache import default_cache_dir

TOKEN_ENV = "NOMOAT_WORKER_TOKEN"
TLS_CA_ENV = "NOMOAT_TLS_CA"
CA_FINGERPRINT_ENV = "NOMOAT_CA_FINGERPRINT"
CACHE_DIR_ENV = "NOMOAT_CACHE_DIR"
THREADS_ENV = "NOMOAT_TORCH_THREADS"
MAX_POWER_ENV = "NOMOAT_MAX_POWER_W"  # the volunteer's --max-power, for the duty cycle in tasks
MAX_UPLOAD_ENV = "NOMOAT_MAX_UPLOAD_MBPS"  # the volunteer's --max-upload-mbps, for the uploader
# Test hooks (tests, demo, benchmarks; never in production), set in a worker's own environment:
# every micro-batch above N runs out of memory (0: even micro-batch 1 does) ...
INJECT_OOM_ENV = "NOMOAT_INJECT_OOM_ABOVE_MICRO_BATCH"
# ... and a simulated card takes at least tokens / (TFLOPS x R) seconds per task, so cards that
# differ in TFLOPS differ in speed although all of them train on the same CPU.
SIM_SPEED_ENV = "NOMOAT_SIMULATED_TOKENS_PER_TFLOP"


@dataclass(frozen=True)
class NodeSettings:
    cache_dir: Path
    token: str = ""  # the volunteer's own worker token; "" uses the spec's
    tls_ca: str = ""  # path of the CA certificate of a coordinator that uses TLS; "": plain gRPC
    ca_fingerprint: str = ""  # the coordinator's own CA, pinned by fingerprint (nomoat.pinning)
    torch_threads: int = 0  # 0: torch's default
    inject_oom_above: int | None = None  # test hook: micro-batches above this run out of memory
    simulated_tokens_per_tflop: float = 0.0  # test hook: a simulated card's speed; 0: as fast as it goes
    max_power_w: float = 0.0  # --max-power: 0 for no limit (worker.controls)
    max_upload_mbps: float = 0.0  # --max-upload-mbps: 0 for no limit

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NodeSettings:
        env = os.environ if env is None else env
        inject = env.get(INJECT_OOM_ENV, "")
        return cls(
            cache_dir=Path(env[CACHE_DIR_ENV]) if env.get(CACHE_DIR_ENV) else default_cache_dir(),
            token=env.get(TOKEN_ENV, ""),
            tls_ca=env.get(TLS_CA_ENV, ""),
            ca_fingerprint=env.get(CA_FINGERPRINT_ENV, ""),
            torch_threads=int(env.get(THREADS_ENV) or 0),
            inject_oom_above=int(inject) if inject else None,
            simulated_tokens_per_tflop=float(env.get(SIM_SPEED_ENV) or 0),
            max_power_w=float(env.get(MAX_POWER_ENV) or 0),
            max_upload_mbps=float(env.get(MAX_UPLOAD_ENV) or 0),
        )

    def env(self) -> dict[str, str]:
        """The environment a Ray node passes these to its tasks in (test hooks stay as they are
        set in the worker's own environment, which the node inherits)."""
        return {
            CACHE_DIR_ENV: str(self.cache_dir),
            TOKEN_ENV: self.token,
            TLS_CA_ENV: self.tls_ca,
            CA_FINGERPRINT_ENV: self.ca_fingerprint,
            THREADS_ENV: str(self.torch_threads),
            MAX_POWER_ENV: str(self.max_power_w),
            MAX_UPLOAD_ENV: str(self.max_upload_mbps),
        }

    @property
    def control_dir(self) -> Path:
        """Where the volunteer's pause and the agent's hold are (worker.controls.ControlFiles)."""
        return self.cache_dir / "control"
