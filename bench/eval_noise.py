"""Benchmark: how noisy a held-out evaluation is at a token budget, paired against unpaired.

    python bench/eval_noise.py                                  # the tiny model, adapters trained for real
    python bench/eval_noise.py --model /tmp/nomoat-scale/llama-h2048-i5632-l22-v32000-s500MB \\
        --max-tokens 2048 --random-adapters                     # the 1B of bench/scale.py

The gate compares a parent and a candidate (parent + one adapter's update) on a job's
validation slice. This measures, on the demo corpus's validation slice cut into ``seq_len``
blocks, for each budget b (tokens per evaluation):

* ``paired_sd``: the spread (standard deviation) over disjoint windows of b tokens of the
  measured difference candidate − parent, both on the same window: the noise of the gate as
  built (coordinator/fold/evaluators.py);
* ``unpaired_sd``: the same spread when the candidate is measured on one window and the parent on
  another: the noise of comparing losses measured on different tokens;
* ``paired_se``: the standard error nomoat.evaluation.paired reports from one window (its
  mean over windows), to check it against ``paired_sd``;
* ``seconds``: one evaluation of b tokens on this machine.

Candidates: adapters trained for real on the tiny model (worker.trainer, a few steps each on a
slice of the corpus), or random rank-16 adapters for a random-weights model, scaled so that their
effect is about ε = 0.02 nats. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere


from nomoat import evaluation
from coordinator.model.running import RunningModel  # noqa: E402
from nomoat import lora  # noqa: E402
from nomoat.adapter import Adapter  # noqa: E402
from nomoat.tiny import read_demo, tiny_model_path  # noqa: E402


def trained_adapters(model_dir: Path, texts: list[str], n: int, steps: int) -> list[Adapter]:
    from worker.trainer import LoraSpec, TrainSpec, train_adapter

    out = []
    for i in range(n):
        shard = texts[i * 64:(i + 1) * 64]
        adapter, _ = train_adapter(model_dir, shard, LoraSpec(rank=8, alpha=16.0),
                                   TrainSpec(max_steps=steps, batch_size=4, micro_batch=4, seed=i))
        out.append(adapter)
    return out


def random_adapters(model: RunningModel, n: int, scale: float) -> list[Adapter]:
    shapes = model.shapes(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        out.append(Adapter({m: (torch.randn(16, d_in, generator=g) / d_in ** 0.5,
                                torch.randn(d_out, 16, generator=g) * scale)
                            for m, (d_out, d_in) in shapes.items()}, rank=16, alpha=32.0))
    return out


def window_losses(losses: evaluation.Losses, start: int, size: int) -> evaluation.Losses:
    return evaluation.Losses(losses.sums[start:start + size], losses.counts[start:start + size])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a Hugging Face folder (default: the tiny model)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--budgets", default="256,512,1024,2048,4096")
    parser.add_argument("--max-tokens", type=int, default=0, help="evaluate at most this many tokens (0: all)")
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="training steps per adapter (tiny model)")
    parser.add_argument("--random-adapters", action="store_true")
    parser.add_argument("--scale", type=float, default=2e-3, help="B's scale for random adapters")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--eval-dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else tiny_model_path()
    texts = read_demo()
    held_out, train_texts = texts[:256], texts[256:]  # as a job's validation slice (at most 256 records)
    model = RunningModel(model_dir)
    adapters = (random_adapters(model, args.adapters, args.scale) if args.random_adapters
                else trained_adapters(model_dir, train_texts, args.adapters, args.steps))
    evals = model.eval_set(held_out, args.seq_len, args.max_tokens)
    t0 = time.time()
    parent = model.losses(evals, dtype=args.eval_dtype)
    per_token_s = (time.time() - t0) / evals.tokens
    candidates = [model.losses(evals, lora.build_patch([a], [1.0]), args.eval_dtype) for a in adapters]
    blocks = len(evals.blocks)
    rows = []
    for budget in [int(b) for b in args.budgets.split(",")]:
        size = max(1, budget // args.seq_len)
        windows = blocks // size
        if windows < 3:
            continue
        paired_d, unpaired_d, ses = [], [], []
        for cand in candidates:
            for w in range(windows):
                p = window_losses(parent, w * size, size)
                c = window_losses(cand, w * size, size)
                other = window_losses(parent, ((w + 1) % windows) * size, size)
                paired_d.append(c.mean - p.mean)
                unpaired_d.append(c.mean - other.mean)
                ses.append(evaluation.paired(p, c).se)
        # spread around each adapter's own mean difference (adapters differ in their true effect)
        def spread(diffs: list[float]) -> float:
            per = [diffs[i * windows:(i + 1) * windows] for i in range(len(candidates))]
            return statistics.mean(statistics.stdev(d) for d in per)

        rows.append({"budget": size * args.seq_len, "windows": windows, "paired_sd": round(spread(paired_d), 5),
                     "unpaired_sd": round(spread(unpaired_d), 5), "paired_se": round(statistics.mean(ses), 5),
                     "seconds": round(per_token_s * size * args.seq_len, 2)})
        print(rows[-1], flush=True)
    effects = [round(evaluation.paired(parent, c).difference, 4) for c in candidates]
    params = sum(p.numel() for p in model.model.parameters())
    print(json.dumps({"model": str(model_dir), "params": params, "eval_dtype": args.eval_dtype, "tokens": evals.tokens, "blocks": blocks,
                      "adapter_effects": effects, "seconds_per_1k_tokens": round(per_token_s * 1000, 2),
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
