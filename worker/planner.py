"""The memory planner: how to train a LoRA task on a given card without running out of memory.

Pure functions; nothing here touches a device. The task asks ``plan`` for the fastest way to run
on the card it landed on (micro-batch, accumulation, precision, gradient checkpointing,
quantization), priced by the memory model (``nomoat.memory``), and halves the micro-batch if
the estimate was wrong.

    >>> from nomoat.memory import ModelShape
    >>> from transformers import LlamaConfig
    >>> from worker.probe import parse_simulated
    >>> shape = ModelShape.from_config(LlamaConfig(hidden_size=2048, intermediate_size=5632,
    ...     num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000))
    >>> p = plan(shape, lora_rank=8, n_target_modules_per_layer=7, seq_len=1024, batch_size=8,
    ...          card=parse_simulated("RTX 3060:12"))
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from nomoat.card import Card
from nomoat.memory import GiB, ModelShape, estimate_peak_bytes


@dataclass(frozen=True)
class Plan:
    """How to run one task on one card."""

    micro_batch: int
    grad_accum: int
    precision: str  # "fp32" | "bf16" | "fp16"
    gradient_checkpointing: bool
    quantization: str | None  # None | "4bit" (TRAINABLE_QUANTIZATIONS)
    est_peak_gb: float


class DoesNotFit(ValueError):
    """No plan fits the card; the message says what the task needs and what would help."""

    def __init__(self, message: str, needed_gb: float, usable_gb: float):
        super().__init__(message)
        self.needed_gb = needed_gb
        self.usable_gb = usable_gb



def _precision_for(card: Card) -> str:
    if card.backend == "cpu":
        return "fp32"  # CPUs (and simulated cards, which train on the CPU) run fp32
    if card.bf16:
        return "bf16"  # fp16's range needs loss scaling; bf16 does not
    return "fp16" if card.fp16 else "fp32"


# What the trainer can load a base in besides its compute dtype (worker.trainer.QUANTIZATIONS):
# the planner plans nothing else. 8-bit (bitsandbytes' LLM.int8) is priced by the memory model
# but not trained, so it is never planned: NF4 is smaller and the QLoRA recipe.
TRAINABLE_QUANTIZATIONS = ("4bit",)


def _candidates(batch_size: int, backend: str, allow_quantization: bool):
    """(checkpointing, quantization, micro_batch), fastest first."""
    micro_batches = [m for m in (2**k for k in range(batch_size.bit_length()))
                     if batch_size % m == 0][::-1]
    quantizations = [None] + (list(TRAINABLE_QUANTIZATIONS) if allow_quantization and backend == "cuda" else [])
    for quantization in quantizations:
        for checkpointing in (False, True):
            for micro_batch in micro_batches:
                yield checkpointing, quantization, micro_batch


def plan(
    shape: ModelShape,
    lora_rank: int,
    n_target_modules_per_layer: int,
    seq_len: int,
    batch_size: int,
    card: Card,
    headroom: float = 0.15,
    allow_quantization: bool = True,
    *,
    attention: str = "sdpa",
) -> Plan:
    """The fastest plan whose estimate fits in ``card.vram_gb * (1 - headroom)``.

    Fastest first: the full micro-batch in 16 bits, then smaller micro-batches (same effective
    batch through accumulation), then gradient checkpointing (a third more compute), then 4-bit
    base weights (CUDA with bitsandbytes only; slower matmuls and a small quality cost).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}; it must be at least 1.")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom is {headroom}; it must be a fraction in [0, 1).")
    precision = _precision_for(card)
    usable = card.vram_gb * (1 - headroom) * GiB
    for checkpointing, quantization, micro_batch in _candidates(
        batch_size, card.backend, allow_quantization
    ):
        need = estimate_peak_bytes(shape, lora_rank, n_target_modules_per_layer, seq_len,
                                   micro_batch, precision, checkpointing, quantization,
                                   backend=card.backend, attention=attention)
        if need <= usable:
            return Plan(micro_batch, batch_size // micro_batch, precision, checkpointing,
                        quantization, round(need / GiB, 2))
    raise _does_not_fit(shape, lora_rank, n_target_modules_per_layer, seq_len, card, headroom,
                        allow_quantization, attention)


def _does_not_fit(shape: ModelShape, rank: int, n_targets: int, seq_len: int, card: Card,
                  headroom: float, allow_quantization: bool, attention: str) -> DoesNotFit:
    precision = _precision_for(card)
    quantize = allow_quantization and card.backend == "cuda"
    smallest = "micro-batch 1 with gradient checkpointing"
    if quantize:
        smallest += " and 4-bit weights"

    def need(seq: int, quantization: str | None) -> float:
        return estimate_peak_bytes(shape, rank, n_targets, seq, 1, precision, True, quantization,
                                   backend=card.backend, attention=attention) / GiB

    needed = need(seq_len, "4bit" if quantize else None)
    usable = card.vram_gb * (1 - headroom)
    help_ = []
    if card.backend == "cuda" and not allow_quantization and need(seq_len, "4bit") <= usable:
        help_.append("allowing 4-bit quantization would make it fit")
    shorter = seq_len // 2
    while shorter >= 64 and need(shorter, "4bit" if quantize else None) > usable:
        shorter //= 2
    if shorter >= 64:
        help_.append(f"a seq_len of {shorter} would fit")
    help_.append(f"a card with at least {needed / (1 - headroom):.1f} GB would fit")
    return DoesNotFit(
        f"This task ({shape.n_params / 1e9:.2g}B parameters, seq_len {seq_len}, LoRA rank {rank}) "
        f"needs {needed:.1f} GB even at {smallest}, but {card.name} has {card.vram_gb:g} GB, "
        f"{usable:.1f} GB of it usable with {headroom:.0%} kept free; "
        + "; ".join(help_) + ".",
        needed_gb=round(needed, 2),
        usable_gb=round(usable, 2),
    )



def planning_card(card: Card) -> Card:
    """A simulated card plans as the CUDA card it stands for (16-bit, CUDA overheads), though it
    trains on the CPU in fp32: its VRAM is pretend, and so must its plan be."""
    if not card.simulated:
        return card
    return replace(card, backend="cuda", bf16=True, fp16=True)


