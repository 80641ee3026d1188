"""The "tiny" base model: a ~1M-parameter Llama pretrained on the CPU, shipped in the package.

It exists so that the demo and the tests fine-tune a real (if small) language model offline:
it has seen English text, so LoRA on a new domain behaves like LoRA on a real model (held-out
loss drops after a short run) rather than like training from noise.

How it was made (and how to remake it; about 4 minutes on 2 idle CPU cores)::

    python -m nomoat.tiny --out nomoat/data/tiny

1. A byte-level BPE tokenizer (vocab 2048, special tokens ``<|bos|>``, ``<|eos|>``, ``<|pad|>``)
   is trained with ``tokenizers`` on ``data/pretrain.txt`` (Debian fortune cookies separated by
   ``%`` lines). It adds no special tokens by itself; texts are packed GPT-style, each followed
   by ``<|eos|>`` (see :mod:`nomoat.packing`).
2. A Llama (hidden 128, 4 layers, 4 heads, MLP 352, tied embeddings, 512 positions) is trained
   from seed 0 on those fortunes (about 580k tokens), packed into 128-token blocks: AdamW,
   batch 32, linear warm-up then cosine decay, ``--steps`` (default 1000, about 7 epochs)
   optimizer steps. The committed model ends at a train loss of 3.4 nats/token and scores 4.22
   on held-out demo text (uniform guessing: ln 2048 = 7.62).
3. Both are saved with ``save_pretrained`` (float32 safetensors), so
   ``AutoModelForCausalLM.from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)``
   load them. The folder is committed (under 5 MB) so nobody needs to rebuild it.

The fine-tuning corpus, ``data/demo.jsonl``, holds other fortune categories (computers, science,
linux), disjoint from the pretraining text but for 13 fortunes Debian files under two categories.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from nomoat.packing import loss_sum, pack

DATA = Path(__file__).parent / "data"
PRETRAIN_TXT = DATA / "pretrain.txt"
DEMO_JSONL = DATA / "demo.jsonl"

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
VOCAB_SIZE = 2048
SEQ_LEN = 128
BATCH = 32
LR = 3e-3
WARMUP = 100
DEFAULT_STEPS = 1000


def tiny_model_path() -> Path:
    """The packaged tiny model folder (model and tokenizer)."""
    return DATA / "tiny"


def read_fortunes(path: Path = PRETRAIN_TXT) -> list[str]:
    """The fortunes of a fortune(6) file: texts separated by lines holding only ``%``."""
    text = path.read_text(encoding="utf-8")
    return [t.strip("\n") for t in re.split(r"^%\n", text, flags=re.M) if t.strip()]


def read_demo(path: Path = DEMO_JSONL) -> list[str]:
    """The ``text`` of every record of the demo fine-tuning corpus, in file order."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def train_tokenizer(texts: Sequence[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (no unknown tokens: any byte sequence encodes)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=512
    )


def tiny_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def pretrain(
    model: LlamaForCausalLM, blocks: torch.Tensor, steps: int, seed: int = 0, log_every: int = 100
) -> float:
    """Train ``model`` on random batches of ``blocks``; returns the mean loss of the last steps."""
    gen = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=(0.9, 0.95),
    )
    model.train()
    recent: list[float] = []
    t0 = time.time()
    for step in range(steps):
        # Linear warm-up, then cosine down to a tenth of the peak.
        if step < WARMUP:
            lr = LR * (step + 1) / WARMUP
        else:
            frac = (step - WARMUP) / max(1, steps - WARMUP)
            lr = LR * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = blocks[torch.randint(len(blocks), (BATCH,), generator=gen)]
        total, count = loss_sum(model, batch)
        loss = total / count
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-50:]
        if log_every and (step + 1) % log_every == 0:
            print(
                f"step {step + 1}/{steps}  loss {sum(recent) / len(recent):.3f}  "
                f"lr {lr:.2e}  {time.time() - t0:.0f}s",
                flush=True,
            )
    return sum(recent) / max(1, len(recent))


def build(out: Path, steps: int = DEFAULT_STEPS, seed: int = 0) -> dict[str, float]:
    """Build the tiny model and its tokenizer into ``out``; returns a few numbers about the run."""
    torch.manual_seed(seed)
    fortunes = read_fortunes()
    tokenizer = train_tokenizer(fortunes)
    blocks = pack(tokenizer, fortunes, SEQ_LEN)
    model = LlamaForCausalLM(tiny_config(tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{len(fortunes)} fortunes, {blocks.numel()} tokens, {n_params} parameters", flush=True)
    t0 = time.time()
    final_loss = pretrain(model, blocks, steps, seed=seed)
    seconds = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # transformers 5 writes its own class name, "TokenizersBackend", which 4.x cannot load;
    # the 4.x name still loads in 5, and pyproject allows both.
    config_path = out / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tok_config, indent=2) + "\n")
    return {"params": n_params, "seconds": seconds, "train_loss": final_loss}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nomoat.tiny",
        description="Rebuild the tiny base model (tokenizer + Llama) from data/pretrain.txt.",
        epilog="example: python -m nomoat.tiny --out nomoat/data/tiny",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model into")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    stats = build(args.out, steps=args.steps, seed=args.seed)
    print(
        f"wrote {args.out}: {stats['params']:.0f} parameters, final train loss "
        f"{stats['train_loss']:.3f}, {stats['seconds']:.0f}s of training"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
