"""On a CUDA card: nomoat's trainer against a plain PEFT loop, and the planner against the card.

Builds a Llama-style model of ~134M parameters from a config (no hub; the tiny model's tokenizer),
then on the same card and data:

* ``trainer_vs_plain_peft``: tokens/s of ``worker.trainer.train_adapter`` (with the memory plan
  the planner chose for this card) over tokens/s of a plain PEFT loop (``model(ids,
  labels=ids).loss``, same dtype, micro-batch and accumulation). Target >= 0.95.
* ``planner_error``: (estimate - measured) / measured, where measured is
  ``torch.cuda.max_memory_allocated`` over the trainer's run and the estimate is the planner's
  peak for the same plan without what the allocator does not count (CUDA context, fragmentation).
  Target within 15%.

    python bench/gpu_check.py               # CUDA card
    python bench/gpu_check.py --device cpu  # a small model on the CPU; says so in its output

On the CPU the model is ~4M parameters and the "measured" peak is the growth of the process's
peak RSS (a rough stand-in: malloc keeps freed blocks), so both figures are indicative only.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig  # noqa: E402

from nomoat.demo import DEMO_DATA  # noqa: E402
from nomoat.packing import PAD, inputs, pack  # noqa: E402
from nomoat.tiny import tiny_model_path  # noqa: E402
from nomoat import memory  # noqa: E402
from worker import planner  # noqa: E402
from worker.probe import parse_simulated, probe  # noqa: E402
from worker.trainer import LLAMA_LINEARS, LoraSpec, TrainSpec, compute_dtype, train_adapter  # noqa: E402

BIG = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
           num_key_value_heads=12, vocab_size=32000, max_position_embeddings=2048)
SMALL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=2048, max_position_embeddings=1024)


def build_model(folder: Path, shape: dict) -> int:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**shape, tie_word_embeddings=False))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_path() / name, folder / name)
    return sum(p.numel() for p in model.parameters())


def plain_peft(folder: Path, texts: list[str], lora: LoraSpec, train: TrainSpec, device: str) -> tuple[int, float]:
    """The loop a PEFT user writes: HF loss, AdamW, gradient accumulation. Returns (tokens, seconds)."""
    t0 = time.time()
    torch.manual_seed(train.seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    blocks = pack(tokenizer, texts, train.seq_len)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=compute_dtype(train.precision, device))
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, task_type="CAUSAL_LM",
                                             target_modules=list(lora.target_modules))).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train.learning_rate)
    tokens, accum = 0, train.batch_size // train.micro_batch
    for start in range(0, len(blocks), train.batch_size):
        batch = blocks[start:start + train.batch_size].to(device)
        for micro in batch.split(train.micro_batch):
            (model(input_ids=inputs(micro), labels=micro).loss / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int((batch != PAD).sum())
    if device == "cuda":
        torch.cuda.synchronize()
    return tokens, time.time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--records", type=int, default=0, help="0: 3000 on CUDA, 300 on the CPU")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run with --device cpu for the small CPU version")
    shape_cfg, seq_len = (BIG, 512) if cuda else (SMALL, 128)
    folder = Path(tempfile.mkdtemp(prefix="nomoat-gpu-check-"))
    n_params = build_model(folder, shape_cfg)
    lines = DEMO_DATA.read_text(encoding="utf-8").splitlines()[: args.records or (3000 if cuda else 300)]
    texts = [json.loads(line)["text"] for line in lines]

    card = probe() if cuda else parse_simulated("cpu:8:1")
    lora = LoraSpec(rank=8, alpha=16.0, target_modules=LLAMA_LINEARS)
    shape = memory.ModelShape.from_config(LlamaConfig(**shape_cfg, tie_word_embeddings=False))
    backend = "cuda" if cuda else "cpu"
    plan_card = card if cuda else replace(card, backend="cpu")
    chosen = planner.plan(shape, lora.rank, len(lora.target_modules), seq_len, 16, plan_card,
                          allow_quantization=False)
    train = TrainSpec(seq_len=seq_len, batch_size=16, micro_batch=chosen.micro_batch, precision=chosen.precision,
                      gradient_checkpointing=chosen.gradient_checkpointing, learning_rate=1e-3)
    print(json.dumps({"device": args.device, "card": card.name, "params": n_params, "plan": chosen.__dict__}),
          flush=True)

    # Warm-up (kernels, allocator, file cache), then the measured runs.
    train_adapter(folder, texts[:40], lora, replace(train, max_steps=1), device=args.device)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    _, result = train_adapter(folder, texts, lora, train, device=args.device)
    if cuda:
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - before
    else:
        measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    ours = result.tokens / result.seconds
    plain_tokens, plain_s = plain_peft(folder, texts, lora, train, args.device)
    plain = plain_tokens / plain_s

    est = memory.estimate(shape, lora.rank, len(lora.target_modules), seq_len, chosen.micro_batch,
                           chosen.precision, chosen.gradient_checkpointing, None, backend=backend)
    counted = est.total - est.overhead  # the allocator counts neither the context nor fragmentation
    if not cuda:
        counted = est.total - memory._FIXED_OVERHEAD["cpu"]  # RSS does count fragmentation
        counted -= est.base_weights  # the weights were already resident from the warm-up run
    error = (counted - measured) / measured if measured > 0 else math.nan
    print(json.dumps({
        "device": args.device, "note": "" if cuda else "CPU stand-in: a ~4M-param model, peak RSS growth; not the CUDA check",
        "params": n_params, "trainer_tokens_per_s": round(ours, 1), "plain_peft_tokens_per_s": round(plain, 1),
        "trainer_vs_plain_peft": round(ours / plain, 3), "planner_estimate_bytes": int(counted),
        "measured_peak_bytes": int(measured), "planner_error": round(error, 3),
    }))


if __name__ == "__main__":
    main()
