"""Dispatch leased tasks to Ray: each becomes a Ray task that asks for what its card must have.

A task asks for one ``nomoat_slot`` (one task per card at a time) and the ``vram_gb`` its
memory plan needs, so Ray only places it on a node whose card can hold it. Ray retries a task
whose node died; other failures come back through :meth:`poll` so the scheduler can release
the lease and re-issue the task with a new fence.
"""

from __future__ import annotations

import logging
from typing import Any

import ray

from coordinator.scheduler import Finished
from coordinator.submit import JobConfig
from worker.planner import ModelShape, min_vram_gb
from worker.probe import VRAM_RESOURCE, WORKER_RESOURCE
from worker.task import run_task

log = logging.getLogger("nomoat.dispatch")


def task_resources(model_config: Any, config: JobConfig) -> dict[str, float]:
    """What a task of this job asks Ray for: one card to itself, with enough memory.

    Quantized plans are left out until the trainer can load a 4/8-bit base (bitsandbytes).
    """
    need = min_vram_gb(ModelShape.from_config(model_config), config.lora_rank, len(config.target_modules),
                       config.seq_len, "cuda", allow_quantization=False)
    return {WORKER_RESOURCE: 1.0, VRAM_RESOURCE: need}


def describe(exc: BaseException) -> str:
    """One line for the ledger: Ray wraps the task's own exception; keep its message."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:500]


class RayDispatcher:
    def __init__(self) -> None:
        self._remote = ray.remote(run_task)
        self._refs: dict[ray.ObjectRef, tuple[str, int]] = {}

    def submit(self, spec: dict[str, Any], resources: dict[str, float]) -> None:
        ref = self._remote.options(
            name=f"nomoat:{spec['task_id']}",
            num_cpus=0,
            resources=resources,
            max_retries=1,  # node death; a task's own errors are the scheduler's to retry
            retry_exceptions=False,
        ).remote(spec)
        self._refs[ref] = (spec["task_id"], spec["fence"])

    def poll(self) -> list[Finished]:
        if not self._refs:
            return []
        ready, _ = ray.wait(list(self._refs), num_returns=len(self._refs), timeout=0)
        finished = []
        for ref in ready:
            task_id, fence = self._refs.pop(ref)
            try:
                ray.get(ref)
                finished.append(Finished(task_id, fence, ""))
            except ray.exceptions.TaskCancelledError:
                continue
            except Exception as exc:  # noqa: BLE001  (any task failure is reported, not raised)
                finished.append(Finished(task_id, fence, describe(exc)))
        return finished

    def cancel(self, task_id: str) -> None:
        for ref, (tid, _) in list(self._refs.items()):
            if tid == task_id:
                ray.cancel(ref, force=True)
                self._refs.pop(ref, None)

    def in_flight(self) -> int:
        return len(self._refs)
