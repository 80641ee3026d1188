"""Benchmark: bytes a worker or user downloads to catch up, against downloading full weights.

A model with hidden size 2048 (TinyLlama-1.1B's shape: 22 layers, MLP 5632, 4 KV heads, 32k
vocabulary, published in bf16); each version folds 8 adapters of rank 8 on every attention and
MLP projection, so its patch is an exact rank-64 LoRA per matrix, stored in fp32. Patch sizes are
the real serialized sizes of such patches (built with the coordinator's own ``build_patch`` and
``nomoat.adapter.to_bytes``); the snapshot size is the bf16 weights' size. The path for each gap is
what the coordinator's ``plan_catch_up`` chooses: the patch chain, the nearest snapshot (every
``--snapshot-every`` versions) plus the patches after it, or the wanted version's own folder
(built on demand), whichever is fewest bytes.

    python bench/patches.py [--snapshot-every 10] [--versions 25]

The last line is one JSON object; ``patch_vs_full_bytes`` is the ratio at 1 version behind.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from coordinator.fold.folding import build_patch
from coordinator.model.history import plan_catch_up
from nomoat.adapter import Adapter, to_bytes

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def model_config() -> LlamaConfig:
    return LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)


def linear_shapes(config: LlamaConfig) -> tuple[dict[str, tuple[int, int]], int]:
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = {name: (m.out_features, m.in_features) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS}
    return shapes, sum(p.numel() for p in model.parameters())


def version_patch_bytes(shapes: dict[str, tuple[int, int]], adapters: int, rank: int, seed: int) -> int:
    g = torch.Generator().manual_seed(seed)
    made = [Adapter({m: (torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g))
                     for m, (d_out, d_in) in shapes.items()}, rank=rank, alpha=2.0 * rank)
            for _ in range(adapters)]
    return len(to_bytes(build_patch(made, [1.0 / adapters] * adapters)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot-every", type=int, default=10)
    parser.add_argument("--versions", type=int, default=25)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()

    started = time.perf_counter()
    shapes, n_params = linear_shapes(model_config())
    full = n_params * 2  # bf16 safetensors; the header is a few kB
    print(f"model: {n_params / 1e9:.2f}B parameters, {len(shapes)} adapted matrices, full weights {full / 1e9:.2f} GB")
    patch_bytes = {}
    for v in range(1, args.versions + 1):
        patch_bytes[v] = version_patch_bytes(shapes, args.adapters, args.rank, seed=v)
    print(f"one version's patch ({args.adapters} adapters of rank {args.rank}, fp32): {patch_bytes[1] / 1e6:.1f} MB")
    snapshots = {v: full for v in range(0, args.versions + 1, args.snapshot_every)}

    want = args.versions
    rows = {}
    print(f"{'behind':>6} {'path':>34} {'bytes':>12} {'vs full':>8}")
    for behind in (1, 5, 20):
        plan = plan_catch_up(want - behind, want, patch_bytes, snapshots, full_bytes=full)
        path = (f"snapshot v{plan.snapshot} + {len(plan.patches)} patches" if plan.snapshot is not None
                else f"{len(plan.patches)} patches")
        rows[behind] = plan.bytes / full
        print(f"{behind:>6} {path:>34} {plan.bytes:>12,} {rows[behind]:>8.3f}")
    print(f"wall time {time.perf_counter() - started:.1f} s")
    print(json.dumps({
        "patch_vs_full_bytes": round(rows[1], 4),
        "behind_5": round(rows[5], 4),
        "behind_20": round(rows[20], 4),
        "patch_mb": round(patch_bytes[1] / 1e6, 1),
        "full_gb": round(full / 1e9, 3),
        "snapshot_every": args.snapshot_every,
    }))


if __name__ == "__main__":
    main()
