"""Schedule: pending tasks are leased and dispatched; expired or failed ones go back in the queue.

The ledger is the source of truth; the dispatcher (Ray here) is how a leased task reaches a
node. Ray places each task on a node whose advertised resources fit it and retries it if the
node dies; the lease deadline catches hangs; a task whose Ray run failed is released and, while
it has attempts left, leased again with a new fence.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from coordinator.ledger import Ledger
from coordinator.settings import Settings
from coordinator.submit import JobConfig

log = logging.getLogger("nomoat.scheduler")


@dataclass(frozen=True)
class Finished:
    task_id: str
    fence: int
    error: str  # "" on success


class Dispatcher(Protocol):
    """How a leased task reaches a worker (Ray now; an outbound gRPC pull mode later)."""

    def submit(self, spec: dict[str, Any], resources: dict[str, float]) -> None: ...
    def poll(self) -> list[Finished]: ...
    def cancel(self, task_id: str) -> None: ...
    def in_flight(self) -> int: ...


@dataclass
class Scheduler:
    settings: Settings
    ledger: Ledger
    dispatcher: Dispatcher
    worker_token: str
    task_resources: Any  # callable(JobConfig) -> dict[str, float]
    _configs: dict[str, JobConfig] = field(default_factory=dict)

    def config(self, job_id: str) -> JobConfig:
        if job_id not in self._configs:
            self._configs[job_id] = JobConfig.from_dict(json.loads(self.ledger.job(job_id)["config"]))
        return self._configs[job_id]

    def tick(self, now: float | None = None) -> set[str]:
        """One round; returns the running jobs with nothing left to train (ready for a last fold)."""
        now = now or time.time()
        for task_id in self.ledger.expire_leases(now):
            log.warning("lease of %s expired; it goes back in the queue", task_id)
            self.dispatcher.cancel(task_id)
        for done in self.dispatcher.poll():
            if done.error:
                state = self.ledger.release(done.task_id, done.fence, done.error, self.settings.max_attempts)
                if state:
                    log.warning("task %s failed (%s); now %s", done.task_id, done.error, state)
        self._dispatch(now)
        return self._update_jobs()

    def spec(self, task: dict[str, str], fence: int, base_version: int) -> dict[str, Any]:
        config = self.config(task["job"])
        return {
            "task_id": task["task_id"],
            "job_id": task["job"],
            "fence": fence,
            "base_version": base_version,
            "coordinator": self.settings.join_address,
            "token": self.worker_token,
            "lora": {"rank": config.lora_rank, "alpha": config.lora_alpha,
                     "target_modules": list(config.target_modules)},
            "train": {"seq_len": config.seq_len, "batch_size": config.batch_size,
                      "learning_rate": config.learning_rate, "epochs": config.epochs,
                      "seed": int(task.get("index", 0))},
            "lease_ttl_s": self.settings.lease_ttl_s,
        }

    def _dispatch(self, now: float) -> None:
        room = self.settings.max_in_flight - self.dispatcher.in_flight()
        if room <= 0:
            return
        base_version = self.ledger.latest_version() or 0
        for task_id in self.ledger.pending(room):
            fence = self.ledger.lease(task_id, now + self.settings.queue_timeout_s, base_version,
                                      self.settings.max_attempts)
            if fence <= 0:
                if fence < 0:
                    log.warning("task %s failed: no attempts left", task_id)
                continue
            task = self.ledger.task(task_id)
            config = self.config(task["job"])
            self.dispatcher.submit(self.spec(task, fence, base_version), self.task_resources(config))

    def _update_jobs(self) -> set[str]:
        idle: set[str] = set()
        buffered_jobs = {a.get("job") for a in self.ledger.buffered()}
        for job_id in self.ledger.job_ids():
            job = self.ledger.job(job_id)
            if job.get("state") != "running":
                continue
            counts = self.ledger.task_counts(job_id)
            if counts["pending"] or counts["leased"]:
                continue
            if job_id in buffered_jobs:
                idle.add(job_id)
                continue
            if counts["done"] == 0:
                self.ledger.set_job(job_id, state="failed", error="every task failed; see `nomoat status`")
            elif int(job.get("adapters_folded", 0)) == 0:
                self.ledger.set_job(job_id, state="failed",
                                    error="no adapter of this job passed the checks to be folded")
            else:
                self.ledger.set_job(job_id, state="done", finished=time.time())
        return idle
