"""Benchmark: folding K adapters at once vs merging them one by one (PEFT's way) vs the roofline.

    python bench/fold.py --device cpu              # full run, a few minutes on 2 CPU cores
    python bench/fold.py --device cpu --threads 1  # on a CPU shared with other busy processes
    python bench/fold.py --device cuda --quick     # small shapes, few repetitions: a smoke test

Weights have Llama-like shapes (q/k/v/o, gate/up/down; hidden 1024, intermediate 2816, 8 layers:
103M parameters in adapted matrices). For each rank in (8, 16) and K in (8, 32) random adapters
are folded into the same fp32 weights three ways:

* ``fold``      coordinator.fold.folding.fold: concatenate, then one ``addmm_`` per matrix
                (also timed in its two halves, ``build`` and ``apply``);
* ``peft``      one adapter after another, as ``merge_and_unload`` does: materialize
                ``(B @ A) * scaling``, then ``W += delta`` (K read/write passes over every weight);
                ``its mm`` is the time of its ``B @ A`` products alone;
* ``roofline``  max(one read+write pass over the weights at the copy bandwidth, the fold's FLOPs
                at the rate of a large square fp32 matmul), both measured in this run, between
                the fold's repetitions.

Both methods do the same FLOPs (2·d_out·d_in·Σr per matrix). The fold wins by running them as
one GEMM with a large inner dimension and by touching each weight once, so the best speedup
possible is ``peft / roofline`` (``speedup_bound`` in the JSON): large where memory is slow next
to compute (GPUs), small where one CPU core has bandwidth to spare.

On a CPU with more busy processes than cores, libgomp's spinning threads stall each parallel
region for up to a scheduler slice (~0.25 s seen here), which swamps a run of many small ops
(the sequential merge most). ``--threads 1`` or ``OMP_WAIT_POLICY=PASSIVE`` avoids it; the
JSON records both settings. Times are medians after a warm-up. The last line printed is one JSON
object; ``fold_vs_peft_speedup`` and ``fold_vs_roofline`` are for K=32, rank 16.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from coordinator.fold.folding import apply_patch, build_patch, fold, fold_weights  # noqa: E402
from nomoat.adapter import Adapter  # noqa: E402

Weights = dict[str, torch.Tensor]
Sync = Callable[[], None]

PROJECTIONS = {  # name -> (d_out, d_in) from (hidden, intermediate)
    "self_attn.q_proj": lambda h, i: (h, h),
    "self_attn.k_proj": lambda h, i: (h, h),
    "self_attn.v_proj": lambda h, i: (h, h),
    "self_attn.o_proj": lambda h, i: (h, h),
    "mlp.gate_proj": lambda h, i: (i, h),
    "mlp.up_proj": lambda h, i: (i, h),
    "mlp.down_proj": lambda h, i: (h, i),
}


def model_shapes(hidden: int, intermediate: int, layers: int) -> dict[str, tuple[int, int]]:
    return {
        f"model.layers.{n}.{p}": f(hidden, intermediate)
        for n in range(layers)
        for p, f in PROJECTIONS.items()
    }


def random_adapters(
    shapes: dict[str, tuple[int, int]], k: int, rank: int, device: torch.device, seed: int
) -> list[Adapter]:
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(k):
        factors = {
            m: (
                torch.randn(rank, d_in, generator=g, device=device) * 0.01,
                torch.randn(d_out, rank, generator=g, device=device) * 0.01,
            )
            for m, (d_out, d_in) in shapes.items()
        }
        out.append(Adapter(factors, rank=rank, alpha=2.0 * rank))
    return out


def peft_sequential(master: Weights, adapters: list[Adapter], weights: list[float]) -> None:
    """PEFT's merge, once per adapter: ``delta = (B @ A) * scaling; W += delta``."""
    with torch.no_grad():
        for adapter, w in zip(adapters, weights):
            scaling = w * adapter.scale
            for module, (a, b) in adapter.factors.items():
                master[module] += (b @ a) * scaling


def peft_gemms_only(master: Weights, adapters: list[Adapter], scratch: Weights) -> None:
    """Only the ``B @ A`` products of ``peft_sequential``, into reused buffers."""
    with torch.no_grad():
        for adapter in adapters:
            for module, (a, b) in adapter.factors.items():
                if module not in scratch:
                    scratch[module] = torch.empty_like(master[module])
                torch.mm(b, a, out=scratch[module])


def timed(fn: Callable[[], object], reps: int, sync: Sync, warmup: int = 1) -> list[float]:
    """Wall times of ``reps`` runs of ``fn`` after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def timed_within(fn: Callable[[], object], reps: int, sync: Sync, budget_s: float) -> list[float]:
    """``timed`` without warm-up that stops repeating once ``budget_s`` is spent."""
    times: list[float] = []
    while len(times) < reps and sum(times) < budget_s:
        times += timed(fn, 1, sync, warmup=0)
    return times


def interleaved(
    fns: dict[str, Callable[[], object]], reps: int, sync: Sync
) -> dict[str, list[float]]:
    """Time several functions round-robin, so that a neighbour's load hits them all alike."""
    for fn in fns.values():
        fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name] += timed(fn, 1, sync, warmup=0)
    return times


class Probes:
    """The roofline's two rates: a large copy (bytes/s) and a large square fp32 matmul (FLOP/s)."""

    def __init__(self, device: torch.device, quick: bool) -> None:
        n = (16 if quick else 64) * 2**20  # floats: 64 MiB / 256 MiB, far past any cache
        self.copy_bytes = 2 * 4 * n
        self.src = torch.rand(n, device=device)
        self.dst = torch.empty_like(self.src)
        side = 1024 if quick else (2048 if device.type == "cpu" else 8192)
        self.matmul_flops = 2 * side**3
        self.x = torch.rand(side, side, device=device)
        self.y = torch.rand(side, side, device=device)
        self.z = torch.empty(side, side, device=device)

    def copy(self) -> None:
        self.dst.copy_(self.src)

    def matmul(self) -> None:
        torch.mm(self.x, self.y, out=self.z)


def run_case(
    master: Weights, probes: Probes, k: int, rank: int, reps: int, peft_reps: int, sync: Sync
) -> dict[str, float]:
    device = next(iter(master.values())).device
    shapes = {m: tuple(w.shape) for m, w in master.items()}
    params = sum(w.numel() for w in master.values())
    adapters = random_adapters(shapes, k, rank, device, seed=rank * 100 + k)
    weights = fold_weights([1000 + 37 * i for i in range(k)], [i % 4 for i in range(k)], 4)
    patch = build_patch(adapters, weights, device=device)
    apply = functools.partial(apply_patch, master, patch)
    times = interleaved(
        {
            "copy": probes.copy,
            "matmul": probes.matmul,
            "fold": lambda: fold(master, adapters, weights),
            "build": lambda: build_patch(adapters, weights, device=device),
            "apply": apply,
        },
        reps,
        sync,
    )
    del apply, patch  # the patch's memory back before the PEFT baselines run
    med = {key: statistics.median(v) for key, v in times.items()}
    bandwidth = probes.copy_bytes / med["copy"]
    flop_rate = probes.matmul_flops / med["matmul"]
    flops = 2 * params * k * rank
    roofline = max(2 * 4 * params / bandwidth, flops / flop_rate)
    # Warm up on one adapter: a full sequential warm-up would double the longest part.
    peft_sequential(master, adapters[:1], weights[:1])
    peft = timed_within(lambda: peft_sequential(master, adapters, weights), peft_reps, sync, 60)
    scratch: Weights = {}
    peft_gemm = timed(lambda: peft_gemms_only(master, adapters, scratch), 1, sync)[0]
    return dict(
        k=k, rank=rank, total_rank=k * rank, bandwidth=bandwidth, flop_rate=flop_rate,
        roofline_s=roofline, build_s=med["build"], apply_s=med["apply"], fold_s=med["fold"],
        fold_min_s=min(times["fold"]), peft_s=statistics.median(peft), peft_gemm_s=peft_gemm,
        speedup=statistics.median(peft) / med["fold"], vs_roofline=med["fold"] / roofline,
        fold_gflops=flops / med["fold"] / 1e9,
    )  # fmt: skip


HEADER = (
    f"{'rank':>4} {'K':>3} {'Σr':>4} | {'GB/s':>5} {'GFLOP/s':>7} {'roofline':>8} | "
    f"{'build':>7} {'apply':>7} {'fold':>7} | {'peft':>7} {'its mm':>7} | "
    f"{'speedup':>7} {'vs roof':>7} {'fold GF/s':>9}"
)


def table_row(r: dict[str, float]) -> str:
    return (
        f"{r['rank']:>4} {r['k']:>3} {r['total_rank']:>4} | {r['bandwidth'] / 1e9:>5.1f} "
        f"{r['flop_rate'] / 1e9:>7.1f} {r['roofline_s']:>7.3f}s | {r['build_s']:>6.3f}s "
        f"{r['apply_s']:>6.3f}s {r['fold_s']:>6.3f}s | {r['peft_s']:>6.3f}s "
        f"{r['peft_gemm_s']:>6.3f}s | {r['speedup']:>6.2f}x {r['vs_roofline']:>6.2f}x "
        f"{r['fold_gflops']:>9.1f}"
    )


def summary(rows: list[dict[str, float]], device: str, quick: bool, params: int) -> dict:
    main_row = next(r for r in rows if r["k"] == 32 and r["rank"] == 16)
    keys = ("fold_s", "fold_min_s", "build_s", "apply_s", "peft_s", "peft_gemm_s", "roofline_s")
    return {
        "device": device,
        "quick": quick,
        "params": params,
        "bandwidth_gbps": round(main_row["bandwidth"] / 1e9, 2),
        "matmul_gflops": round(main_row["flop_rate"] / 1e9, 1),
        "fold_vs_peft_speedup": round(main_row["speedup"], 3),
        "fold_vs_roofline": round(main_row["vs_roofline"], 3),
        "cases": {
            f"k{r['k']}_r{r['rank']}": {
                **{key: round(r[key], 4) for key in keys},
                "matmul_gflops": round(r["flop_rate"] / 1e9, 1),
                "speedup": round(r["speedup"], 3),
                "speedup_bound": round(r["peft_s"] / r["roofline_s"], 3),
                "vs_roofline": round(r["vs_roofline"], 3),
            }
            for r in rows
        },
        "threads": torch.get_num_threads(),
        "omp": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA card")
    if args.threads:
        torch.set_num_threads(args.threads)
    sync: Sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    hidden, intermediate, layers = (512, 1408, 4) if args.quick else (1024, 2816, 8)
    reps, peft_reps = (2, 1) if args.quick else (5, 3)

    shapes = model_shapes(hidden, intermediate, layers)
    params = sum(o * i for o, i in shapes.values())
    torch.manual_seed(0)
    master = {m: torch.randn(s, device=device) * 0.02 for m, s in shapes.items()}
    probes = Probes(device, args.quick)
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; adapted parameters: {params / 1e6:.1f}M in {len(shapes)} matrices")
    print(f"medians of {reps} interleaved repetitions (peft: {peft_reps}), after a warm-up")
    print()
    print(HEADER)
    print("-" * len(HEADER))
    rows = []
    for rank in (8, 16):
        for k in (8, 32):
            rows.append(run_case(master, probes, k, rank, reps, peft_reps, sync))
            print(table_row(rows[-1]), flush=True)
    print()
    print("speedup = peft / fold (target ≥ 3 at K=32); vs roof = fold / roofline (target ≤ 1.25)")
    print(json.dumps(summary(rows, name, args.quick, params)))


if __name__ == "__main__":
    main()
