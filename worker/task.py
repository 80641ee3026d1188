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
from dataclasses import dataclass, replace
from typing import Any

from nomoat import adapter as adapter_format
from nomoat.client import CoordinatorClient, NomoatError
from worker import planner, uploader
from worker.cache import ModelCache, default_cache_dir
from worker.probe import Card, probe
from worker.trainer import LoraSpec, TrainSpec, train_adapter

log = logging.getLogger("nomoat.task")

# Test hooks, set in a worker node's environment (tests, demo, benchmarks; never in production):
# every micro-batch above N runs out of memory (0: even micro-batch 1 does) ...
INJECT_OOM_ENV = "NOMOAT_INJECT_OOM_ABOVE_MICRO_BATCH"
# ... and a simulated card takes at least tokens / (TFLOPS x R) seconds per task, so cards that
# differ in TFLOPS differ in speed although all of them train on the same CPU.
SIM_SPEED_ENV = "NOMOAT_SIMULATED_TOKENS_PER_TFLOP"


class TaskAborted(RuntimeError):
    """The task cannot finish; the message says why (it is recorded in the ledger)."""


class Heartbeat(threading.Thread):
    def __init__(self, client: CoordinatorClient, task_id: str, fence: int, worker_id: str, interval: float) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{task_id}")
        self.client, self.task_id, self.fence, self.worker_id = client, task_id, fence, worker_id
        self.interval = interval
        self.lost = ""
        self.base_version = -1  # the version to train on, as the coordinator fixes it
        self.lineage = ""  # the model lineage that version belongs to
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
            self.base_version, self.lineage = reply.base_version, reply.lineage

    def note(self, event: str) -> None:
        """Record ``event`` about this run in the ledger (an out-of-memory retry, say)."""
        log.warning("task %s: %s", self.task_id, event)
        try:
            self.client.heartbeat(self.task_id, self.fence, self.worker_id, event=event)
        except NomoatError as exc:
            log.warning("could not record %r: %s", event, exc)

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


def node_card() -> Card:
    """The card of the node this runs on: the agent passes its probe (or simulation) down."""
    raw = os.environ.get("NOMOAT_CARD")
    return Card(**json.loads(raw)) if raw else probe()


def memory_plan(spec: dict[str, Any], card: Card, model_dir: Any) -> tuple[planner.Plan, TrainSpec]:
    """Plan the task for ``card`` (worker.planner) and turn the plan into the trainer's spec.

    Raises TaskAborted, naming the VRAM it needs, when no plan fits: the scheduler then asks for
    a bigger card.
    """
    from transformers import AutoConfig

    train_cfg, lora_cfg = spec["train"], spec["lora"]
    plan_model = train_cfg.get("plan_model", "")
    shape = planner.shape_for(plan_model, None if plan_model else AutoConfig.from_pretrained(model_dir))
    try:
        chosen = planner.plan(shape, lora_cfg["rank"], len(lora_cfg["target_modules"]), train_cfg["seq_len"],
                              train_cfg["batch_size"], planner.planning_card(card), allow_quantization=False)
    except planner.DoesNotFit as exc:
        raise TaskAborted(f"{exc} {planner.bigger_card_reason(card.vram_gb)}") from None
    min_seconds = 0.0
    rate = float(os.environ.get(SIM_SPEED_ENV) or 0)
    if rate > 0 and card.simulated:
        min_seconds = float(spec.get("tokens", 0)) / (card.tflops * rate)
    train = TrainSpec(**{k: train_cfg[k] for k in ("seq_len", "batch_size", "learning_rate", "epochs", "seed")},
                      micro_batch=chosen.micro_batch, precision=chosen.precision,
                      gradient_checkpointing=chosen.gradient_checkpointing, min_seconds=min_seconds)
    return chosen, train


def train_fitting(model_dir: Any, texts: list[str], lora: LoraSpec, train: TrainSpec, card: Card,
                  heartbeat: Heartbeat) -> tuple[Any, Any]:
    """Train; on out-of-memory halve the micro-batch (same effective batch) and retry on this card.

    Each retry is recorded in the ledger. When micro-batch 1 runs out too, the task fails with a
    reason that makes the scheduler retry it on a card with more VRAM than this one.
    """
    import torch

    inject = os.environ.get(INJECT_OOM_ENV)
    device = "cuda" if card.backend == "cuda" and not card.simulated else "cpu"
    micro = train.micro_batch
    while True:
        try:
            if inject is not None and micro > int(inject):
                raise torch.OutOfMemoryError(f"injected by {INJECT_OOM_ENV}={inject} (a test hook)")
            return train_adapter(model_dir, texts, lora, replace(train, micro_batch=micro), device=device,
                                 progress=lambda step, total, loss: heartbeat.check())
        except torch.OutOfMemoryError:
            if device == "cuda":
                torch.cuda.empty_cache()
            if micro == 1:
                heartbeat.note(f"out of memory at micro-batch 1 on {card.name} ({card.vram_gb:g} GB); "
                               "moving to a bigger card")
                raise TaskAborted(f"out of memory even at micro-batch 1 on {card.name}: "
                                  f"{planner.bigger_card_reason(card.vram_gb)}") from None
            heartbeat.note(f"out of memory at micro-batch {micro} on {card.name} ({card.vram_gb:g} GB); "
                           f"retrying at micro-batch {micro // 2}")
            micro //= 2


def run_task(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one leased task; raises TaskAborted (or the trainer's error) when it cannot finish."""
    threads = int(os.environ.get("NOMOAT_TORCH_THREADS", "0"))
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    worker_id = os.environ.get("NOMOAT_WORKER_ID", "")
    task_id, fence = spec["task_id"], int(spec["fence"])
    token = os.environ.get("NOMOAT_WORKER_TOKEN") or spec["token"]  # the volunteer's own, when it has one
    with CoordinatorClient(spec["coordinator"], token, spec.get("tls_ca") or None) as client:
        heartbeat = Heartbeat(client, task_id, fence, worker_id, interval=max(1.0, spec["lease_ttl_s"] / 4))
        heartbeat.beat()  # claims the lease (and learns the version to train on) before any work
        heartbeat.check()
        if heartbeat.base_version < 0:
            raise TaskAborted("the coordinator could not be reached to start the task")
        base_version = heartbeat.base_version
        heartbeat.start()
        try:
            texts = [json.loads(line)["text"] for line in client.fetch_shard(task_id, fence).splitlines()]
            model_dir = ModelCache().ensure(client, heartbeat.lineage, base_version)
            lora = LoraSpec(rank=spec["lora"]["rank"], alpha=spec["lora"]["alpha"],
                            target_modules=tuple(spec["lora"]["target_modules"]))
            card = node_card()
            _, train = memory_plan(spec, card, model_dir)
            adapter, result = train_fitting(model_dir, texts, lora, train, card, heartbeat)
            heartbeat.check()
            data = adapter_format.to_bytes(adapter)
            manifest = uploader.manifest_for(task_id, fence, base_version, lora.rank, lora.alpha,
                                             result.tokens, result.train_loss, data, worker_id, heartbeat.lineage)
            sent = _deliver(client, manifest, data)
        finally:
            heartbeat.stop()
    if not sent.accepted:
        raise TaskAborted(f"the coordinator refused the adapter: {sent.reason}")
    log.info("task %s done: %d tokens, loss %.3f", task_id, result.tokens, result.train_loss)
    return TaskOutcome(task_id, sent.adapter_id, result.tokens, result.train_loss, result.seconds).__dict__
