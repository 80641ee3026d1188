"""One task, start to finish, on a worker: the function the coordinator submits to Ray.

    lease (spec) -> fetch shard -> bring the model to the base version -> train -> upload

It uses only gRPC to talk to the coordinator and never imports Ray, so the same path can serve
an outbound-only worker later. While it runs, a heartbeat thread keeps the lease alive; if the
coordinator says the lease is gone (it expired and was re-issued), the task stops early.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from nomoat import adapter as adapter_format
from nomoat.client import CoordinatorClient, NomoatError
from worker import uploader
from worker.cache import ModelCache, default_cache_dir
from worker.trainer import LoraSpec, TrainSpec, train_adapter

log = logging.getLogger("nomoat.task")


class TaskAborted(RuntimeError):
    """The task cannot finish; the message says why (it is recorded in the ledger)."""


class Heartbeat(threading.Thread):
    def __init__(self, client: CoordinatorClient, task_id: str, fence: int, worker_id: str, interval: float) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{task_id}")
        self.client, self.task_id, self.fence, self.worker_id = client, task_id, fence, worker_id
        self.interval = interval
        self.lost = ""
        self.base_version = -1  # the version to train on, as the coordinator fixes it
        self._halt = threading.Event()

    def beat(self) -> None:
        try:
            reply = self.client.heartbeat(self.task_id, self.fence, self.worker_id)
        except NomoatError as exc:  # a missed beat is not fatal; the lease has slack
            log.warning("heartbeat for %s failed: %s", self.task_id, exc)
            return
        if not reply.ok:
            self.lost = reply.reason
            self._halt.set()
        elif self.base_version < 0:
            self.base_version = reply.base_version

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.beat()

    def stop(self) -> None:
        self._halt.set()

    def check(self) -> None:
        if self.lost:
            raise TaskAborted(f"the lease was lost: {self.lost}")


@dataclass(frozen=True)
class TaskOutcome:
    task_id: str
    adapter_id: str
    tokens: int
    train_loss: float
    seconds: float


def _deliver(client: CoordinatorClient, manifest: Any, data: bytes) -> uploader.UploadResult:
    """Upload, keeping the adapter in the outbox until the coordinator answers (see uploader)."""
    outbox = uploader.Outbox(default_cache_dir() / "outbox")
    key = outbox.put(manifest, data)
    try:
        sent = uploader.upload(client, manifest, data)
    except BaseException:
        outbox.give_up(key)  # the worker agent goes on trying
        raise
    outbox.remove(key)
    return sent


def run_task(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one leased task; raises TaskAborted (or the trainer's error) when it cannot finish."""
    threads = int(os.environ.get("NOMOAT_TORCH_THREADS", "0"))
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    worker_id = os.environ.get("NOMOAT_WORKER_ID", "")
    task_id, fence = spec["task_id"], int(spec["fence"])
    with CoordinatorClient(spec["coordinator"], spec["token"], spec.get("tls_ca") or None) as client:
        heartbeat = Heartbeat(client, task_id, fence, worker_id, interval=max(1.0, spec["lease_ttl_s"] / 4))
        heartbeat.beat()  # claims the lease (and learns the version to train on) before any work
        heartbeat.check()
        if heartbeat.base_version < 0:
            raise TaskAborted("the coordinator could not be reached to start the task")
        base_version = heartbeat.base_version
        heartbeat.start()
        try:
            texts = [json.loads(line)["text"] for line in client.fetch_shard(task_id, fence).splitlines()]
            model_dir = ModelCache().ensure(client, base_version)
            lora = LoraSpec(rank=spec["lora"]["rank"], alpha=spec["lora"]["alpha"],
                            target_modules=tuple(spec["lora"]["target_modules"]))
            train = TrainSpec(**{k: spec["train"][k] for k in ("seq_len", "batch_size", "learning_rate",
                                                               "epochs", "seed")},
                              micro_batch=int(spec.get("micro_batch") or spec["train"]["batch_size"]))
            adapter, result = train_adapter(model_dir, texts, lora, train,
                                            progress=lambda step, total, loss: heartbeat.check())
            heartbeat.check()
            data = adapter_format.to_bytes(adapter)
            manifest = uploader.manifest_for(task_id, fence, base_version, lora.rank, lora.alpha,
                                             result.tokens, result.train_loss, data, worker_id)
            sent = _deliver(client, manifest, data)
        finally:
            heartbeat.stop()
    if not sent.accepted:
        raise TaskAborted(f"the coordinator refused the adapter: {sent.reason}")
    log.info("task %s done: %d tokens, loss %.3f", task_id, result.tokens, result.train_loss)
    return TaskOutcome(task_id, sent.adapter_id, result.tokens, result.train_loss, result.seconds).__dict__
