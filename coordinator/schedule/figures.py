"""The coordinator's own figures about cards and volunteers: what placement plans with, measured
or bounded here, never taken from what a worker reports.

* :class:`SpeedClock`: a card's tokens per second, from the scheduler's clock (a lease granted to
  the round that finds its upload accepted) and the tokens of the unit's shard counted at submit;
  :func:`units_for` sizes a run by it.
* :func:`memory_floor`: a unit out of memory reports the VRAM it needs; the figure is capped just
  above the card it ran on and is the task's floor for that card only (:func:`card_key` names
  the card); :func:`waiting_for_a_card` says why a job's tasks fit no card.
* :func:`charge_abandoned`: a lease that expired without a report or a hand-back costs its
  holder's volunteer trust (the ledger gave the task its attempt back).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from coordinator.ledger import Ledger, TaskRecord, TaskState
from coordinator.schedule import standing
from coordinator.schedule.transport import Finished, Node
from nomoat.logs import fields
from nomoat.spec import VRAM_STEP_GB

log = logging.getLogger("nomoat.scheduler")


# -- speed --------------------------------------------------------------------------------------

@dataclass
class SpeedClock:
    """Cards' speeds as the scheduler's clock sees them (one per scheduler: the leader's)."""

    ledger: Ledger
    # Node id -> when the last unit measured on it was accepted: the next unit of the same run
    # started training then (units of a run train one after another), not at its lease.
    _last_done: dict[str, float] = field(default_factory=dict)

    def measure(self, done: Finished, task: TaskRecord | None, now: float) -> None:
        """The card's speed as the coordinator's clock saw it, never as the worker says: the tokens
        of the unit's shard (counted at submit) over the time from its lease (or from the run's
        previous unit on the same card) to ``now``, the round that found its upload accepted. Only
        a unit whose own upload was accepted counts; a run's units come back together, so the
        first carries the run's time and the rest their tokens."""
        if task is None or task.state is not TaskState.DONE or task.fence != done.fence:
            return
        start = max(task.leased_at, self._last_done.get(done.node_id, 0.0))
        self._last_done[done.node_id] = now
        self.ledger.workers.record_run(done.worker_id, done.node_id, task.tokens, max(0.0, now - start))


def units_for(speed: float, unit_tokens: int, target_seconds: float, most: int) -> int:
    """How many units a card of ``speed`` tokens/s gets in a run: about ``target_seconds`` of
    work, at least one, one while its speed is unknown."""
    if speed <= 0 or unit_tokens <= 0:
        return 1
    return max(1, min(most, round(speed * target_seconds / unit_tokens)))


# -- memory -------------------------------------------------------------------------------------

def card_key(node: Node) -> str:
    """How a task's memory floors name a card: its worker, or its node when it names none (as
    Finished names the card a unit ran on)."""
    return node.worker_id or node.node_id


def memory_floor(ledger: Ledger, done: Finished, card_vram_gb: float) -> None:
    """A unit out of memory on every plan of its card (of ``card_vram_gb``, as the coordinator
    knows it): the memory need it reports, bounded by just above that card (it cannot know more),
    is the task's floor on that card only; one report strands it on no other card."""
    if card_vram_gb <= 0:
        return  # a card we cannot size: nothing to bound the report by
    need = min(done.needs_vram_gb, round(card_vram_gb + VRAM_STEP_GB, 2))
    ledger.tasks.require_vram(done.task_id, done.worker_id or done.node_id, need)


def waiting_for_a_card(need_gb: float, need_4bit_gb: float, n_cards: int, largest: float,
                       largest_4bit: float) -> str:
    """Why a job's tasks wait (JobInfo.warning): what they need, with a 4-bit base too where that
    is less, against the largest card in the cluster (and the largest that loads 4-bit weights)."""
    quantized = ""
    if need_4bit_gb < need_gb:
        quantized = (f" ({need_4bit_gb:.1f} GB on a CUDA card whose worker has bitsandbytes, which loads the "
                     "model in 4 bits; " + (f"the largest such card has {largest_4bit:g} GB)" if largest_4bit
                                            else "no such card is in the cluster)"))
    return (f"its tasks need a card with at least {need_gb:.1f} GB of VRAM{quantized}, but the largest of the "
            f"{n_cards} cards in the cluster has {largest:g} GB; they wait until a bigger card joins (a shorter "
            "--seq-len or a smaller LoRA rank needs less)")


# -- abandon ------------------------------------------------------------------------------------

def charge_abandoned(ledger: Ledger, task_ids: Iterable[str]) -> None:
    """Leases that expired without a report or a hand-back cost their holders' volunteers an
    ``abandoned`` outcome (and the tasks no attempt: coordinator.ledger.leases gave it back)."""
    tasks = [t for t in ledger.tasks.many(list(task_ids)) if t.holder_worker]
    volunteers = ledger.trust.of_workers(t.holder_worker for t in tasks)
    for task in tasks:
        volunteer = volunteers.get(task.holder_worker, "")
        ledger.trust.record(volunteer, standing.ABANDONED,
                            f"worker {task.holder_worker} let the lease of task {task.task_id} expire")
        log.warning("worker %s abandoned task %s; its volunteer's trust pays for it", task.holder_worker,
                    task.task_id, extra=fields("lease.abandoned", task=task.task_id, worker=task.holder_worker))
