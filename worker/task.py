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
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nomoat import adapter as adapter_format
from nomoat.card import Card
from nomoat.client import CoordinatorClient, NomoatError
from nomoat.logs import fields, quiet_libraries
from nomoat.memory import shape_for
from nomoat.progress import ProgressFile, TaskProgress
from nomoat.spec import GradientNorms, NeedsBiggerCard, TaskSpec, UnitResult, error_line
from worker import planner, uploader
from worker.cache import ModelCache
from worker.carry import CarryStore
from worker.controls import ControlFiles, Controls, ControlSettings
from worker.gpu import NoGpu, find_gpu
from worker.probe import probe
from worker.settings import INJECT_OOM_ENV, NodeSettings
from worker.trainer import LoraSpec, TrainSpec, can_quantize, train_adapter

log = logging.getLogger("nomoat.task")


class TaskAborted(RuntimeError):
    """The task cannot finish; the message says why (it is recorded in the ledger)."""


class LeaseKeeper(threading.Thread):
    def __init__(self, client: CoordinatorClient, task_id: str, fence: int, worker_id: str, interval: float,
                 secret: str = "") -> None:
        super().__init__(daemon=True, name=f"heartbeat-{task_id}")
        self.client, self.task_id, self.fence, self.worker_id = client, task_id, fence, worker_id
        self.secret = secret  # the lease's secret, from the spec: what proves this run holds it
        self.interval = interval
        self.lost = ""
        self.failed = ""  # why the last beat did not reach the coordinator
        self.base_version = -1  # the version to train on, as the coordinator fixes it
        self.lineage = ""  # the model lineage that version belongs to
        self._halt = threading.Event()

    def beat(self) -> None:
        try:
            reply = self.client.heartbeat(self.task_id, self.fence, self.worker_id, secret=self.secret)
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
            self.client.heartbeat(self.task_id, self.fence, self.worker_id, event=event, secret=self.secret)
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
    norms: GradientNorms = GradientNorms()


def _deliver(client: CoordinatorClient, manifest: Any, data: bytes, outbox_dir: Path,
             pace: uploader.Pace | None = None) -> uploader.UploadResult:
    """Upload, keeping the adapter in the outbox until the coordinator answers (see uploader)."""
    outbox = uploader.Outbox(outbox_dir)
    key = outbox.put(manifest, data)
    try:
        sent = uploader.upload(client, manifest, data, pace=pace)
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
                  heartbeat: LeaseKeeper, inject_oom_above: int | None = None, carry: Any = None,
                  on_step: Callable[[int, int, float], None] | None = None) -> tuple[Any, Any]:
    """Train; on out-of-memory halve the micro-batch (same effective batch) and retry on this card.

    Each retry is recorded in the ledger. When micro-batch 1 runs out too, the task raises
    NeedsBiggerCard, and the scheduler retries it on a card with more VRAM than this one.
    ``inject_oom_above`` is a test hook: micro-batches above it run out of memory. ``carry``: a
    warm-started job's previous factors and moments on this worker (worker.carry), or None.
    ``on_step`` is called after each optimizer step with (step, steps, loss), after the lease check.
    """
    import torch

    device = "cuda" if card.backend == "cuda" and not card.simulated else "cpu"
    micro = train.micro_batch

    def after_step(step: int, total: int, loss: float) -> None:
        heartbeat.check()  # a lost lease stops the run here
        if on_step is not None:
            on_step(step, total, loss)

    while True:
        try:
            if inject_oom_above is not None and micro > inject_oom_above:
                raise torch.OutOfMemoryError(f"injected by {INJECT_OOM_ENV}={inject_oom_above} (a test hook)")
            return train_adapter(model_dir, texts, lora, replace(train, micro_batch=micro), device=device,
                                 progress=after_step,
                                 start=carry.factors if carry else None,
                                 optimizer_state=carry.optimizer_state if carry else None)
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


def task_controls(node: NodeSettings) -> Controls:
    """The volunteer's limits as a process that trains keeps them (--max-power, --max-upload-mbps);
    whether to train at all is the agent's call (worker.controls)."""
    settings = ControlSettings(node.control_dir, max_power_w=node.max_power_w, max_upload_mbps=node.max_upload_mbps)
    return Controls(settings, gpu=find_gpu() if node.max_power_w > 0 else NoGpu())


def step_reporter(task_id: str, train: TrainSpec, controls: Controls, progress: ProgressFile
                  ) -> Callable[[int, int, float], None]:
    """What runs after each optimizer step: the --max-power rest, and the worker's progress line."""
    started = time.monotonic()

    def on_step(step: int, total: int, loss: float) -> None:
        rested = controls.duty_cycle()
        elapsed = max(1e-6, time.monotonic() - started)
        progress.write(TaskProgress(task_id, step, total, loss, step * train.batch_size * train.seq_len / elapsed,
                                    os.getpid(), note=f"rested {rested:.1f} s for --max-power" if rested else ""))

    return on_step


def run_task(spec: TaskSpec, node: NodeSettings, controls: Controls | None = None) -> TaskOutcome:
    """Run one leased task; raises TaskAborted, NeedsBiggerCard or the trainer's error when it cannot finish.

    ``controls``: the volunteer's limits (default: as the node's settings give them)."""
    controls = controls or task_controls(node)
    progress = ProgressFile(node.control_dir / "progress.json")
    task_id, fence, worker_id = spec.task_id, spec.fence, spec.worker_id
    token = node.token or spec.token  # the volunteer's own, when it has one
    with CoordinatorClient(spec.coordinator, token, node.tls_ca or None, node.ca_fingerprint or None) as client:
        heartbeat = LeaseKeeper(client, task_id, fence, worker_id, interval=max(1.0, spec.lease_ttl_s / 4),
                                secret=spec.lease_secret)
        heartbeat.beat()  # proves it holds the lease (and learns the version to train on) before any work
        heartbeat.check()
        if heartbeat.base_version < 0:
            raise TaskAborted(f"the task could not start: {heartbeat.failed or 'the coordinator did not answer'}")
        base_version = heartbeat.base_version
        heartbeat.start()
        try:
            shard = client.fetch_shard(task_id, fence, worker_id, spec.lease_secret)
            texts = [json.loads(line)["text"] for line in shard.splitlines()]
            model_dir = ModelCache(node.cache_dir).ensure(client, heartbeat.lineage, base_version)
            lora = LoraSpec(rank=spec.lora.rank, alpha=spec.lora.alpha, target_modules=spec.lora.target_modules)
            card = node_card(spec)
            _, train = memory_plan(spec, card, model_dir, node)
            carries = CarryStore(node.cache_dir / "carry")
            carry = carries.load(heartbeat.lineage, spec.job_id) if spec.train.warm_start else None
            adapter, result = train_fitting(model_dir, texts, lora, train, card, heartbeat, node.inject_oom_above,
                                            carry, on_step=step_reporter(task_id, train, controls, progress))
            heartbeat.check()
            data = adapter_format.to_bytes(adapter)
            # A warm start's contribution is the exact rank-2r difference: its own rank and alpha.
            manifest = uploader.manifest_for(task_id, fence, base_version, adapter.rank, adapter.alpha,
                                             result.tokens, result.train_loss, data, worker_id, heartbeat.lineage,
                                             result.norms, lease_secret=spec.lease_secret)
            sent = _deliver(client, manifest, data, node.cache_dir / "outbox", pace=controls.throttle_upload)
            if spec.train.warm_start and sent.accepted and result.carry is not None:
                carries.save(heartbeat.lineage, spec.job_id, result.carry)  # what the job's next task here continues
        finally:
            heartbeat.stop()
            progress.clear()  # only now: a pausing agent waits for the upload too
    if not sent.accepted:
        raise TaskAborted(f"the coordinator refused the adapter: {sent.reason}")
    log.info("task %s done: %d tokens, loss %.3f, adapter %s accepted", task_id, result.tokens, result.train_loss,
             sent.adapter_id, extra=fields("task.done", task=task_id, job=spec.job_id, worker=worker_id or None,
                                           fence=fence, tokens=result.tokens, train_loss=result.train_loss,
                                           seconds=result.seconds, adapter=sent.adapter_id))
    return TaskOutcome(task_id, sent.adapter_id, result.tokens, result.train_loss, result.seconds, result.norms)


def run_units(specs: list[TaskSpec], node: NodeSettings | None = None) -> list[UnitResult]:
    """The Ray task the coordinator submits: train a run's units in order on this node; one
    unit's failure is its own. ``node``: this node's own settings (default: read from its
    environment, where the agent put them).

    A unit that needs a bigger card ends the run: the rest would run out of memory here too.
    """
    quiet_libraries()  # this is a Ray worker process: our CLI's edge did not run here
    node = node or NodeSettings.from_env()
    if node.torch_threads > 0:
        import torch

        torch.set_num_threads(node.torch_threads)
    units: list[UnitResult] = []
    bigger: NeedsBiggerCard | None = None
    controls = task_controls(node)
    for spec in specs:
        paused = ControlFiles(node.control_dir).stop_reason()
        if paused:  # the volunteer paused: what has not started goes back, not failed
            units.append(UnitResult(spec.task_id, spec.fence, f"the worker paused: {paused}", handed_back=True))
            continue
        if bigger is not None:
            units.append(UnitResult(spec.task_id, spec.fence, error_line(bigger), needs_vram_gb=bigger.vram_gb))
            continue
        try:
            done = run_task(spec, node, controls)
        except NeedsBiggerCard as exc:
            bigger = exc
            units.append(UnitResult(spec.task_id, spec.fence, error_line(exc), needs_vram_gb=exc.vram_gb))
        except Exception as exc:  # noqa: BLE001  (reported per unit, not raised)
            units.append(UnitResult(spec.task_id, spec.fence, error_line(exc)))
        else:
            units.append(UnitResult(spec.task_id, spec.fence, adapter_id=done.adapter_id, tokens=done.tokens,
                                    train_loss=done.train_loss, seconds=done.seconds, norms=done.norms))
    return units
