"""What this machine's accelerator can do.

``probe()`` looks at the real device (CUDA, then Apple MPS, then the CPU); ``parse_simulated()``
makes a pretend card from a ``NAME:VRAM_GB[:TFLOPS]`` spec, so ``nomoat demo`` can run a
heterogeneous cluster of "GPUs" on one CPU. ``ray_resources()`` and ``ray_labels()`` turn a card
into what its Ray node advertises, which is how the scheduler matches tasks to cards.

    >>> card = parse_simulated("RTX 3060:12")
    >>> labels = ray_labels(card)
    >>> ray_resources(card)["vram_gb"], labels["nomoat/card"], labels["nomoat/loads-4bit"]
    (12.0, 'RTX-3060', 'false')
"""

from __future__ import annotations

import os
import platform
import re

import torch

from nomoat.card import Card
from nomoat.raynode import LABEL_PREFIX, LOADS_4BIT_LABEL, VRAM_RESOURCE, WORKER_RESOURCE

# A spec asking for more than this is a typo (an extra digit), not a card.
_MAX_SIMULATED_VRAM_GB = 1024.0


class ProbeError(ValueError):
    """The device or the simulated-card spec cannot be used; the message says why and what to do."""


def probe(device_index: int = 0) -> Card:
    """Describe the accelerator training would run on: CUDA if present, else MPS, else the CPU."""
    if torch.cuda.is_available():
        return _probe_cuda(device_index)
    if device_index != 0:
        raise ProbeError(
            f"GPU {device_index} was asked for, but this machine has no CUDA device; "
            "leave the device index at 0 to train on what it has."
        )
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return _probe_mps()
    return _probe_cpu()


def _probe_cuda(index: int) -> Card:
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise ProbeError(
            f"CUDA device {index} does not exist: this machine has {count} "
            f"(indices 0 to {count - 1}); pick one of those."
        )
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    capability = f"{props.major}.{props.minor}"
    if torch.version.hip:  # ROCm reports through torch.cuda; its capability numbers differ
        bf16 = torch.cuda.is_bf16_supported()
    else:
        # Not torch.cuda.is_bf16_supported(): it says yes on pre-Ampere cards via slow emulation.
        bf16 = props.major >= 8
    return Card(
        name=props.name,
        vram_gb=_gb(total),
        free_vram_gb=_gb(free),
        compute_capability=capability,
        bf16=bf16,
        fp16=True,
        backend="cuda",
        tflops=tflops_estimate(props.name, capability),
        loads_4bit=_loads_4bit(),
    )


def _loads_4bit() -> bool:
    """Whether this worker's trainer can load a 4-bit base on its CUDA card: the trainer's own rule
    (bitsandbytes importable), so the card never claims what the trainer cannot do."""
    from worker.trainer import can_quantize  # transformers and PEFT: only once a CUDA card is found

    return can_quantize("cuda")


def _probe_mps() -> Card:
    # Unified memory: the GPU can use what Metal recommends, which is most of system RAM.
    total, free = _system_memory_bytes()
    recommended = getattr(torch.mps, "recommended_max_memory", None)
    vram = recommended() if recommended is not None else total
    try:
        bf16 = torch.backends.mps.is_macos_or_newer(14, 0)
    except AttributeError:
        bf16 = False
    name = _cpu_name() or "Apple GPU"
    return Card(
        name=name,
        vram_gb=_gb(vram),
        free_vram_gb=_gb(min(free, vram)),
        compute_capability="",
        bf16=bf16,
        fp16=True,
        backend="mps",
        tflops=tflops_estimate(name, ""),
    )


def _probe_cpu() -> Card:
    total, free = _system_memory_bytes()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return Card(
        name=_cpu_name() or "CPU",
        vram_gb=_gb(total),
        free_vram_gb=_gb(free),
        compute_capability="",
        bf16=False,  # CPUs run bf16 slowly or not at all; the planner trains fp32 there
        fp16=False,
        backend="cpu",
        # About 50 GFLOPS fp32 per core with AVX2/FMA in a real matmul; sizing only.
        tflops=round(0.05 * (cores or 1), 3),
    )


def _gb(n_bytes: int | float) -> float:
    return round(n_bytes / 2**30, 2)


def _system_memory_bytes() -> tuple[int, int]:
    """(total, available) system RAM in bytes."""
    try:
        import psutil  # a Ray dependency, so normally present

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_simulated(spec: str) -> Card:
    """A pretend card from ``NAME:VRAM_GB[:TFLOPS]``: ``"RTX 3060:12"``, ``"RTX 4090:24:82"``.

    It trains on the CPU in fp32 (so it claims no bf16/fp16), but its memory limit is the
    simulated VRAM: the planner sizes tasks as it would for the real card.
    """
    fields = [f.strip() for f in spec.split(":")]
    if len(fields) not in (2, 3):
        raise ProbeError(
            f"Simulated card {spec!r} has {len(fields)} field(s); write NAME:VRAM_GB or "
            "NAME:VRAM_GB:TFLOPS, for example 'RTX 3060:12' or 'RTX 4090:24:82'."
        )
    name = fields[0]
    if not name:
        raise ProbeError(
            f"Simulated card {spec!r} has an empty name; put the card's name before the first "
            "colon, for example 'RTX 3060:12'."
        )
    vram = _positive_number(fields[1], "VRAM_GB", spec)
    if vram > _MAX_SIMULATED_VRAM_GB:
        raise ProbeError(
            f"Simulated card {spec!r} claims {vram:g} GB of VRAM, more than any card has "
            f"(the limit is {_MAX_SIMULATED_VRAM_GB:g}); give the VRAM in gigabytes, e.g. 12."
        )
    tflops = _positive_number(fields[2], "TFLOPS", spec) if len(fields) == 3 else None
    return Card(
        name=name,
        vram_gb=vram,
        free_vram_gb=vram,
        compute_capability="",
        bf16=False,
        fp16=False,
        backend="cpu",
        tflops=tflops if tflops is not None else tflops_estimate(name, ""),
        simulated=True,
    )


def _positive_number(text: str, what: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ProbeError(
            f"Simulated card {spec!r} has {what} {text!r}, which is not a number; "
            "write it in digits, for example 'RTX 3060:12'."
        ) from None
    if not value > 0 or value == float("inf"):  # also catches nan
        raise ProbeError(
            f"Simulated card {spec!r} has {what} {text!r}; it must be a positive number."
        )
    return value


def ray_resources(card: Card) -> dict[str, float]:
    """Custom resources the worker's Ray node advertises.

    A task asks for ``{"nomoat_worker": 1, "vram_gb": memory.min_vram_gb(...)}``: the first keeps
    training on nomoat nodes and runs one task per card at a time (the memory plan assumes the
    whole card); the second keeps tasks off cards too small for them.
    """
    # Ray keeps resource amounts to 4 decimal places; round down so we never claim more.
    vram = int(card.vram_gb * 100) / 100
    return {WORKER_RESOURCE: 1.0, VRAM_RESOURCE: vram}


def ray_labels(card: Card) -> dict[str, str]:
    """Ray node labels, for tasks that want a kind of card (``label_selector``) and for display.

    Ray label values follow Kubernetes' rules: at most 63 characters from ``[A-Za-z0-9_.-]``,
    starting and ending alphanumeric (``ray/_private/label_utils.py``), so free text is slugged.
    """
    return {
        f"{LABEL_PREFIX}card": label_value(card.name) or "unknown",
        f"{LABEL_PREFIX}backend": card.backend,
        f"{LABEL_PREFIX}bf16": "true" if card.bf16 else "false",
        f"{LABEL_PREFIX}fp16": "true" if card.fp16 else "false",
        f"{LABEL_PREFIX}compute-capability": card.compute_capability,  # "" is a valid value
        f"{LABEL_PREFIX}simulated": "true" if card.simulated else "false",
        LOADS_4BIT_LABEL: "true" if card.loads_4bit else "false",
    }


def label_value(text: str) -> str:
    """``text`` as a Ray label value: "NVIDIA GeForce RTX 3060" -> "NVIDIA-GeForce-RTX-3060"."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)
    slug = re.sub(r"-{2,}", "-", slug)[:63]
    return slug.strip("-_.")


# Dense fp16/bf16 tensor throughput with fp32 accumulation (what PyTorch uses), in TFLOPS, from
# the vendors' spec sheets, rounded. GeForce cards run fp32-accumulate at half the rate that
# their headline numbers quote. Sizing only: a task's wall time scales with 1/tflops.
# Longer keys first so "3060 ti" wins over "3060".
_TFLOPS = {
    "rtx 5090": 210, "rtx 5080": 113, "rtx 5070 ti": 88, "rtx 5070": 62, "rtx 5060 ti": 47,
    "rtx 5060": 38,
    "rtx 4090": 82.6, "rtx 4080 super": 52, "rtx 4080": 48.7, "rtx 4070 ti super": 44,
    "rtx 4070 ti": 40.1, "rtx 4070 super": 35.5, "rtx 4070": 29.1, "rtx 4060 ti": 22.1,
    "rtx 4060": 15.1,
    "rtx 3090 ti": 40, "rtx 3090": 35.6, "rtx 3080 ti": 34.1, "rtx 3080": 29.8,
    "rtx 3070 ti": 21.7, "rtx 3070": 20.3, "rtx 3060 ti": 16.2, "rtx 3060": 12.7,
    "rtx 3050": 9.1,
    "rtx 2080 ti": 56.9, "rtx 2080 super": 44.6, "rtx 2080": 42.4, "rtx 2070 super": 36.3,
    "rtx 2070": 31.5, "rtx 2060 super": 28.7, "rtx 2060": 25.8,
    "gtx 1660 ti": 10.9, "gtx 1660 super": 10.1, "gtx 1660": 10.1, "gtx 1650": 6.0,
    "gtx 1080 ti": 11.3, "gtx 1080": 8.9, "gtx 1070": 6.5, "gtx 1060": 4.4,
    "rtx 6000 ada": 364, "rtx 5000 ada": 261, "rtx 4500 ada": 159, "rtx 4000 ada": 106,
    "rtx a6000": 155, "rtx a5000": 111, "rtx a4500": 94, "rtx a4000": 76.7, "rtx a2000": 32,
    "a6000": 155, "a5000": 111, "a4000": 76.7, "a2000": 32,
    "h200": 989, "h100": 756, "a100": 312, "l40s": 362, "l40": 181, "a40": 150, "a10g": 70,
    "a10": 125, "l4": 121, "v100": 125, "t4": 65,
    "m3 max": 16, "m2 max": 13.6, "m1 max": 10.4, "m3 pro": 7.4, "m2 pro": 6.8, "m1 pro": 5.2,
    "m3": 4.1, "m2": 3.6, "m1": 2.6,
}
_TFLOPS_KEYS = sorted(_TFLOPS, key=len, reverse=True)

# Unknown card: go by its architecture (compute capability major.minor, then major).
_TFLOPS_BY_CAPABILITY = {
    "6.0": 10.0, "6.1": 6.0, "7.0": 125.0, "7.5": 25.0, "8.0": 312.0, "8.6": 20.0, "8.7": 10.0,
    "8.9": 40.0, "9.0": 756.0, "10.0": 1000.0, "12.0": 80.0,
    "6": 6.0, "7": 25.0, "8": 20.0, "9": 756.0, "10": 1000.0, "12": 80.0,
}
_TFLOPS_UNKNOWN = 10.0

# Laptop parts run the same chip at lower clocks and power; roughly two thirds of the desktop.
_LAPTOP_FACTOR = 0.65


def tflops_estimate(name: str, capability: str) -> float:
    """Rough dense fp16/bf16 TFLOPS for a card, from its name, else its compute capability."""
    normalized = " " + re.sub(r"[^a-z0-9]+", " ", name.lower()).strip() + " "
    laptop = any(w in normalized for w in (" laptop ", " mobile ", " max q "))
    for key in _TFLOPS_KEYS:
        if f" {key} " in normalized:
            value = float(_TFLOPS[key])
            return round(value * _LAPTOP_FACTOR, 1) if laptop else value
    major = capability.split(".")[0] if capability else ""
    value = _TFLOPS_BY_CAPABILITY.get(capability) or _TFLOPS_BY_CAPABILITY.get(major)
    if value is None:
        return _TFLOPS_UNKNOWN
    return round(value * _LAPTOP_FACTOR, 1) if laptop else value
