"""A task spec: what the coordinator tells a worker to do for one unit, as plain data.

The scheduler builds one per leased unit (:class:`TaskSpec`); it crosses Ray to the worker's
task as a dataclass of primitives, and :meth:`TaskSpec.to_dict` / :meth:`TaskSpec.from_dict`
give the same as a JSON-ready dict, checked field by field, for transports that are not Python
(the outbound gRPC worker). Nothing in it is code: ids, hyperparameters, the card to plan for
and where to reach the coordinator.

What comes back is a :class:`UnitResult` per unit. A unit that runs out of memory on every plan
its card allows raises :class:`NeedsBiggerCard` on the worker and comes back with the VRAM it
needs as a number, which the scheduler stores as the task's demand.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from nomoat.card import Card

# Ray keeps a node's vram_gb to two decimals (worker.probe.ray_resources rounds down to them):
# the least VRAM that is more than a card's.
VRAM_STEP_GB = 0.01


class SpecError(ValueError):
    """A task spec (or a unit's result) is malformed; the message names the field."""


class NeedsBiggerCard(RuntimeError):
    """Out of memory on every plan this card allows: the task needs a card with ``vram_gb``."""

    def __init__(self, reason: str, vram_gb: float) -> None:
        super().__init__(reason)
        self.vram_gb = vram_gb

    @classmethod
    def than(cls, card_vram_gb: float, reason: str) -> NeedsBiggerCard:
        """The task needs more than a card of ``card_vram_gb`` GB (the one it failed on)."""
        return cls(f"{reason}; it needs a card with more than {card_vram_gb:g} GB",
                   round(card_vram_gb + VRAM_STEP_GB, 2))


def error_line(exc: BaseException) -> str:
    """One line for the ledger: the exception's kind and the last line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:500]


@dataclass(frozen=True)
class LoraConfig:
    """The adapter to train: every ``target_modules`` linear of every layer gets rank ``rank``."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class TrainConfig:
    """How to train; the worker's planner picks micro-batch and precision for its card."""

    seq_len: int
    batch_size: int
    learning_rate: float
    epochs: int
    seed: int
    plan_model: str = ""  # plan memory as if the base were this preset (nomoat.memory); "": itself
    warm_start: bool = False  # continue from this worker's carry of the job (worker.carry), if it has one


@dataclass(frozen=True)
class TaskSpec:
    """One leased unit, as the worker that trains it needs to know it."""

    task_id: str
    job_id: str
    fence: int
    base_version: int
    tokens: int
    coordinator: str  # HOST:PORT the task reaches the coordinator at
    token: str  # the coordinator's worker token; a volunteer's own replaces it on its node
    lora: LoraConfig
    train: TrainConfig
    lease_ttl_s: float
    worker_id: str = ""  # the worker whose node the run is placed on
    card: Card | None = None  # that worker's card as it registered it; None: the node probes its own
    # The lease's secret: with worker_id, what proves this run holds the lease (heartbeats, the
    # shard, the upload, the report). It travels only here; the coordinator keeps its hash.
    lease_secret: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSpec:
        return _build(cls, data, "task spec")


@dataclass(frozen=True)
class GradientNorms:
    """What the gradient noise scale is estimated from (McCandlish et al. 2018, appendix A): the
    squared norm, summed over the LoRA parameters, of one micro-batch's mean gradient and of the
    whole batch's, each averaged over the steps, with the two batch sizes in sequences. The
    trainer measures them (``worker.trainer``); ``coordinator.schedule.noise`` turns them into B_simple.
    Zero sizes: not measured (a batch of one sequence has no smaller micro-batch)."""

    micro_sq: float = 0.0  # E|g_micro|², averaged over every micro-batch of every step
    batch_sq: float = 0.0  # E|g_batch|², averaged over the steps
    micro_batch: float = 0.0  # sequences per micro-batch (harmonic mean)
    batch_size: float = 0.0  # sequences per batch (harmonic mean)


@dataclass(frozen=True)
class UnitResult:
    """How one unit of a run ended."""

    task_id: str
    fence: int
    error: str = ""  # "" on success, else one line for the ledger
    needs_vram_gb: float = 0.0  # > 0: out of memory on every plan; a card needs at least this much
    adapter_id: str = ""
    tokens: int = 0
    train_loss: float = 0.0
    seconds: float = 0.0
    norms: GradientNorms = GradientNorms()  # the gradient noise measurement its adapter was uploaded with
    # Not started, given back because the volunteer paused (worker.controls); ``error`` says why.
    # Back in the queue without spending an attempt: the unit did not fail.
    handed_back: bool = False

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UnitResult:
        return _build(cls, data, "unit result")


# -- plain data in and out ------------------------------------------------------------------------

T = TypeVar("T")


def _plain(value: Any) -> Any:
    """Dataclasses as dicts and tuples as lists, recursively: what JSON or protobuf can carry."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type[T], data: Any, where: str) -> T:
    if not isinstance(data, dict):
        raise SpecError(f"{where} must be a mapping, not {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SpecError(f"{where} has unknown field(s) {', '.join(unknown)} (from a newer nomoat?)")
    values = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SpecError(f"{where} lacks the field {name}")
            continue
        values[name] = _value(hints[name], data[name], f"{where} field {name}")
    return cls(**values)


def _value(kind: Any, value: Any, where: str) -> Any:
    origin = get_origin(kind)
    if origin in (Union, types.UnionType):
        options = get_args(kind)
        if value is None and type(None) in options:
            return None
        (kind,) = [k for k in options if k is not type(None)]
        return _value(kind, value, where)
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"{where} must be a list, not {type(value).__name__}")
        (item,) = [k for k in get_args(kind) if k is not Ellipsis]
        return tuple(_value(item, v, where) for v in value)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind in (int, str, bool) and isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise SpecError(f"{where} must be {kind.__name__}, not {value!r}")
