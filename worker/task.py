"""One task, start to finish, on a worker; :func:`run_units` is what the coordinator submits to Ray.

    lease (spec) -> fetch shard -> bring the model to the base version -> train -> upload

The coordinator says what to do in a :class:`~nomoat.spec.TaskSpec` (plain data); what only this
node knows (the volunteer's token and CA, the cache, threads, test hooks) is read once at the
entry into :class:`~worker.settings.NodeSettings`. It uses only gRPC to talk to the coordinator
and never imports Ray, so the same path can serve an outbound-only worker later. While it runs,
a heartbeat thread keeps the lease alive; if the coordinator says the lease is gone (it expired
and was re-issued), the task stops early.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nomoat import adapter as adapter_format
from nomoat.card import Card
from nomoat.client import CoordinatorClient, NomoatError
from nomoat.memory import shape_for
from nomoat.spec import NeedsBiggerCard, TaskSpec, UnitResult, error_line
from worker import planner, uploader
from worker.cache import ModelCache
from worker.probe import probe
from worker.settings import INJECT_OOM_ENV, NodeSettings
from worker.trainer import LoraSpec, TrainSpec, can_quantize, train_adapter

log = logging.getLogger("nomoat.task")


class TaskAborted(RuntimeError):
    """The task cannot finish; the message says why (it is recorded in the ledger)."""


class Heartbeat(threading.Thread):
    def __init__(self, client: CoordinatorClient, task_id: str, fence: int, worker_id: str, interval: float) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{task_id}")
        self.client, self.task_id, self.fence, self.worker_id = client, task_id, fence, worker_id
        self.interval = interval
        self.lost = ""
        self.failed = ""  # why the last beat did not reach the coordinator
        self.base_version = -1  # the version to train on, as the coordinator fixes it
        self.lineage = ""  # the model lineage that version belongs to
        self._halt = threading.Event()

    def beat(self) -> None:
        try:
            reply = self.client.heartbeat(self.task_id, self.fence, self.worker_id)
        except NomoatError as exc:  # a missed beat is not fatal; the lease has slack
            log.warning("heartbeat for %s failed: %s", self.task_id, exc)
            self.failed = str(exc)
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


def _deliver(client: CoordinatorClient, manifest: Any, data: bytes, outbox_dir: Path) -> uploader.UploadResult:
    """Upload, keeping the adapter in the outbox until the coordinator answers (see uploader)."""
    outbox = uploader.Outbox(outbox_dir)
    key = outbox.put(manifest, data)
    try:
        sent = uploader.upload(client, manifest, data)
    except BaseException:
        outbox.give_up(key)  # the worker agent goes on trying
        raise
    outbox.remove(key)
    return sent


def node_card(spec: TaskSpec) -> Card:
    """The card to plan for: the one the coordinator placed the run on (as its worker registered
    it), else, from a coordinator that does not say, this node's own probe."""
    return spec.card if spec.card is not None else probe()


def memory_plan(spec: TaskSpec, card: Card, model_dir: Any, node: NodeSettings) -> tuple[planner.Plan, TrainSpec]:
    """Plan the task for ``card`` (worker.planner) and turn the plan into the trainer's spec.

    Raises NeedsBiggerCard when no plan fits: the scheduler then asks for a bigger card.
    """
    from transformers import AutoConfig

    train_cfg, lora_cfg = spec.train, spec.lora
    plan_model = train_cfg.plan_model
    shape = shape_for(plan_model, None if plan_model else AutoConfig.from_pretrained(model_dir))
    # A 4-bit base only where the trainer can load one: a real CUDA card with bitsandbytes here.
    quantize = card.backend == "cuda" and not card.simulated and can_quantize("cuda")
    try:
        chosen = planner.plan(shape, lora_cfg.rank, len(lora_cfg.target_modules), train_cfg.seq_len,
                              train_cfg.batch_size, planner.planning_card(card), allow_quantization=quantize)
    except planner.DoesNotFit as exc:
        raise NeedsBiggerCard.than(card.vram_gb, str(exc).rstrip(".")) from None
    min_seconds = 0.0
    rate = node.simulated_tokens_per_tflop
    if rate > 0 and card.simulated:
        min_seconds = float(spec.tokens) / (card.tflops * rate)
    train = TrainSpec(seq_len=train_cfg.seq_len, batch_size=train_cfg.batch_size,
                      learning_rate=train_cfg.learning_rate, epochs=train_cfg.epochs, seed=train_cfg.seed,
                      micro_batch=chosen.micro_batch, precision=chosen.precision,
                      gradient_checkpointing=chosen.gradient_checkpointing, quantization=chosen.quantization,
                      min_seconds=min_seconds)
    return chosen, train


def train_fitting(model_dir: Any, texts: list[str], lora: LoraSpec, train: TrainSpec, card: Card,
                  heartbeat: Heartbeat, inject_oom_above: int | None = None) -> tuple[Any, Any]:
    """Train; on out-of-memory halve the micro-batch (same effective batch) and retry on this card.

    Each retry is recorded in the ledger. When micro-batch 1 runs out too, the task raises
    NeedsBiggerCard, and the scheduler retries it on a card with more VRAM than this one.
    ``inject_oom_above`` is a test hook: micro-batches above it run out of memory.
    """
    import torch

    device = "cuda" if card.backend == "cuda" and not card.simulated else "cpu"
    micro = train.micro_batch
    while True:
        try:
            if inject_oom_above is not None and micro > inject_oom_above:
                raise torch.OutOfMemoryError(f"injected by {INJECT_OOM_ENV}={inject_oom_above} (a test hook)")
            return train_adapter(model_dir, texts, lora, replace(train, micro_batch=micro), device=device,
                                 progress=lambda step, total, loss: heartbeat.check())
        except torch.OutOfMemoryError:
            if device == "cuda":
                torch.cuda.empty_cache()
            if micro == 1:
                heartbeat.note(f"out of memory at micro-batch 1 on {card.name} ({card.vram_gb:g} GB); "
                               "moving to a bigger card")
                raise NeedsBiggerCard.than(card.vram_gb, f"out of memory even at micro-batch 1 on {card.name}") \
                    from None
            heartbeat.note(f"out of memory at micro-batch {micro} on {card.name} ({card.vram_gb:g} GB); "
                           f"retrying at micro-batch {micro // 2}")
            micro //= 2


def run_task(spec: TaskSpec, node: NodeSettings) -> TaskOutcome:
    """Run one leased task; raises TaskAborted, NeedsBiggerCard or the trainer's error when it cannot finish."""
    task_id, fence, worker_id = spec.task_id, spec.fence, spec.worker_id
    token = node.token or spec.token  # the volunteer's own, when it has one
    with CoordinatorClient(spec.coordinator, token, node.tls_ca or None) as client:
        heartbeat = Heartbeat(client, task_id, fence, worker_id, interval=max(1.0, spec.lease_ttl_s / 4))
        heartbeat.beat()  # claims the lease (and learns the version to train on) before any work
        heartbeat.check()
        if heartbeat.base_version < 0:
            raise TaskAborted(f"the task could not start: {heartbeat.failed or 'the coordinator did not answer'}")
        base_version = heartbeat.base_version
        heartbeat.start()
        try:
            texts = [json.loads(line)["text"] for line in client.fetch_shard(task_id, fence).splitlines()]
            model_dir = ModelCache(node.cache_dir).ensure(client, heartbeat.lineage, base_version)
            lora = LoraSpec(rank=spec.lora.rank, alpha=spec.lora.alpha, target_modules=spec.lora.target_modules)
            card = node_card(spec)
            _, train = memory_plan(spec, card, model_dir, node)
            adapter, result = train_fitting(model_dir, texts, lora, train, card, heartbeat, node.inject_oom_above)
            heartbeat.check()
            data = adapter_format.to_bytes(adapter)
            manifest = uploader.manifest_for(task_id, fence, base_version, lora.rank, lora.alpha,
                                             result.tokens, result.train_loss, data, worker_id, heartbeat.lineage)
            sent = _deliver(client, manifest, data, node.cache_dir / "outbox")
        finally:
            heartbeat.stop()
    if not sent.accepted:
        raise TaskAborted(f"the coordinator refused the adapter: {sent.reason}")
    log.info("task %s done: %d tokens, loss %.3f", task_id, result.tokens, result.train_loss)
    return TaskOutcome(task_id, sent.adapter_id, result.tokens, result.train_loss, result.seconds)


def run_units(specs: list[TaskSpec], node: NodeSettings | None = None) -> list[UnitResult]:
    """The Ray task the coordinator submits: train a run's units in order on this node; one
    unit's failure is its own. ``node``: this node's own settings (default: read from its
    environment, where the agent put them).

    A unit that needs a bigger card ends the run: the rest would run out of memory here too.
    """
    node = node or NodeSettings.from_env()
    if node.torch_threads > 0:
        import torch

        torch.set_num_threads(node.torch_threads)
    units: list[UnitResult] = []
    bigger: NeedsBiggerCard | None = None
    for spec in specs:
        if bigger is not None:
            units.append(UnitResult(spec.task_id, spec.fence, error_line(bigger), needs_vram_gb=bigger.vram_gb))
            continue
        try:
            done = run_task(spec, node)
        except NeedsBiggerCard as exc:
            bigger = exc
            units.append(UnitResult(spec.task_id, spec.fence, error_line(exc), needs_vram_gb=exc.vram_gb))
        except Exception as exc:  # noqa: BLE001  (reported per unit, not raised)
            units.append(UnitResult(spec.task_id, spec.fence, error_line(exc)))
        else:
            units.append(UnitResult(spec.task_id, spec.fence, adapter_id=done.adapter_id, tokens=done.tokens,
                                    train_loss=done.train_loss, seconds=done.seconds))
    return units
