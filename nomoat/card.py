"""A card: what an accelerator can do, as far as task sizing cares.

The worker's probe (``worker.probe``) makes one; the worker registers it (``pb.Card``); the
coordinator keeps it in the ledger and names it in every task spec it sends that worker, so the
task plans for the card the scheduler placed it on. Plain data, the same on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

from nomoat.v1 import nomoat_pb2 as pb


@dataclass(frozen=True)
class Card:
    """One accelerator, as far as task sizing cares."""

    name: str
    vram_gb: float
    free_vram_gb: float
    compute_capability: str  # "8.6"; "" when not CUDA
    bf16: bool
    fp16: bool
    backend: str  # "cuda" | "mps" | "cpu"
    tflops: float  # rough dense fp16/bf16 throughput (fp32 on cpu); only sizes tasks
    simulated: bool = False
    # It can load a base in 4 bits (NF4 by bitsandbytes, QLoRA): a real CUDA card whose worker has
    # bitsandbytes (worker.trainer.can_quantize). The scheduler places on it the tasks whose 4-bit
    # plan fits. Never a simulated card: it trains on the CPU.
    loads_4bit: bool = False


def to_message(card: Card) -> pb.Card:
    return pb.Card(name=card.name, vram_gb=card.vram_gb, compute_capability=card.compute_capability,
                   bf16=card.bf16, backend=card.backend, simulated=card.simulated, tflops=card.tflops,
                   loads_4bit=card.loads_4bit)


def from_message(message: pb.Card) -> Card:
    """The card a worker registered. The message is float32 and leaves out what follows from the
    rest: fp16 is there on every accelerator (the probe says so on CUDA and MPS, never on the CPU,
    which is also where simulated cards train), and the free VRAM of a card at rest is all of it."""
    vram = round(float(message.vram_gb), 2)  # the probe's precision; float32 adds noise below it
    return Card(name=message.name, vram_gb=vram, free_vram_gb=vram, compute_capability=message.compute_capability,
                bf16=message.bf16, fp16=message.backend in ("cuda", "mps"), backend=message.backend,
                tflops=round(float(message.tflops), 3), simulated=message.simulated,
                # what a simulated card claims is not believed: it trains on the CPU
                loads_4bit=message.loads_4bit and message.backend == "cuda" and not message.simulated)
