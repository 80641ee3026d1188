"""One training task: a base model folder and some texts in, a LoRA adapter out.

No networking here (no gRPC, Ray or Redis): the Ray task, the outbound-only worker and the tests
all call :func:`train_adapter` the same way. Read it top to bottom:

1. load the base model in float32 and wrap it with a fresh, seeded PEFT LoRA;
2. pack the texts into ``seq_len`` blocks (:mod:`nomoat.packing`, the same packing the
   coordinator evaluates with);
3. per epoch, shuffle the blocks with the seed and take ``batch_size`` blocks per optimizer step,
   fed through the model ``micro_batch`` at a time (gradient accumulation);
4. return the LoRA factors as an :class:`~nomoat.adapter.Adapter`, with how many tokens it saw.

Example::

    from worker.trainer import LoraSpec, TrainSpec, train_adapter
    adapter, result = train_adapter(tiny_model_path(), texts, LoraSpec(), TrainSpec(max_steps=20))
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

from nomoat.adapter import Adapter, from_peft_state_dict
from nomoat.packing import PAD, loss_sum, n_tokens, pack

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSpec:
    """The adapter's shape: every ``target_modules`` linear of every layer gets rank ``rank``."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = LLAMA_LINEARS
    dropout: float = 0.0


@dataclass(frozen=True)
class TrainSpec:
    """How to train. ``batch_size`` sequences make one optimizer step, whatever ``micro_batch``
    (how many go through the model at once; it must divide ``batch_size``) is."""

    seq_len: int = 128
    batch_size: int = 8
    micro_batch: int = 8
    learning_rate: float = 2e-3
    epochs: int = 1
    seed: int = 0
    max_steps: int | None = None
    # The memory plan (worker.planner.plan). The frozen base computes in ``precision`` on CUDA;
    # the CPU always runs fp32. The LoRA factors and their optimizer state stay fp32 regardless.
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16"
    gradient_checkpointing: bool = False
    # Test hook (simulated cards): pad the run's wall time to at least this many seconds, as a
    # slower card would take. 0 leaves it alone.
    min_seconds: float = 0.0


@dataclass
class TrainResult:
    tokens: int  # real (non-padding) tokens fed through the model, over all steps taken
    train_loss: float  # mean next-token loss over those steps, per token
    steps: int  # optimizer steps taken
    seconds: float


Progress = Callable[[int, int, float], None]  # (step, total_steps, loss of that step)


def _check(lora: LoraSpec, train: TrainSpec) -> None:
    if lora.rank < 1 or lora.alpha <= 0:
        raise ValueError(
            f"LoRA rank must be >= 1 and alpha > 0 (got rank {lora.rank}, alpha {lora.alpha})"
        )
    if not lora.target_modules:
        raise ValueError("LoraSpec.target_modules is empty; name the linear layers to adapt")
    if train.micro_batch < 1 or train.batch_size % train.micro_batch:
        raise ValueError(
            f"micro_batch ({train.micro_batch}) must divide batch_size ({train.batch_size}); "
            "the effective batch is batch_size either way"
        )
    if train.epochs < 1 or (train.max_steps is not None and train.max_steps < 1):
        raise ValueError("epochs and max_steps must be at least 1")


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(precision: str, device: str) -> torch.dtype:
    """The base model's dtype: the plan's on an accelerator, fp32 on the CPU (slow and lossy in
    16 bits there)."""
    if precision not in _DTYPES:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(_DTYPES)}")
    return torch.float32 if str(device).startswith("cpu") else _DTYPES[precision]


def _lora_model(model_dir: Path, lora: LoraSpec, device: str, dtype: torch.dtype = torch.float32,
                checkpointing: bool = False) -> torch.nn.Module:
    """The base model in ``dtype`` with fresh fp32 LoRA factors on ``lora.target_modules``.

    The factors are fp32 (PEFT's ``autocast_adapter_dtype``) because a small update vanishes in
    bf16 rounding (see DESIGN, folding math); PEFT draws A from torch's global generator, which
    the caller has seeded, and starts B at zero.
    """
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if checkpointing:
        # Non-reentrant: works with frozen inputs (no enable_input_require_grads needed).
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=list(lora.target_modules),
        lora_dropout=lora.dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config).to(device)
    model.train()
    return model


def train_adapter(
    model_dir: Path,
    texts: Sequence[str],
    lora: LoraSpec,
    train: TrainSpec,
    *,
    device: str = "cpu",
    progress: Progress | None = None,
) -> tuple[Adapter, TrainResult]:
    """Train a fresh LoRA on ``texts`` over the model in ``model_dir``; the same inputs give the
    same adapter."""
    _check(lora, train)
    t0 = time.time()
    torch.manual_seed(train.seed)  # LoRA's A, and dropout if any, draw from the global generator

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    blocks = pack(tokenizer, texts, train.seq_len)
    model = _lora_model(model_dir, lora, device, compute_dtype(train.precision, device),
                        train.gradient_checkpointing)

    steps_per_epoch = math.ceil(len(blocks) / train.batch_size)
    total_steps = steps_per_epoch * train.epochs
    if train.max_steps is not None:
        total_steps = min(total_steps, train.max_steps)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=0.0)
    # fp16's narrow range underflows small gradients without loss scaling; bf16 and fp32 need none.
    scaler = torch.amp.GradScaler(str(device).split(":")[0],
                                  enabled=compute_dtype(train.precision, device) == torch.float16)
    gen = torch.Generator().manual_seed(train.seed)
    step, tokens, targets_seen, loss_total = 0, 0, 0, 0.0
    while step < total_steps:
        order = torch.randperm(len(blocks), generator=gen)
        for batch in (blocks[idx] for idx in order.split(train.batch_size)):
            if step == total_steps:
                break
            # Each micro-batch adds its *summed* loss divided by the whole batch's target count,
            # so the accumulated gradient is the batch mean whatever micro_batch is.
            n_targets = max(1, int((batch[:, 1:] != PAD).sum()))
            opt.zero_grad(set_to_none=True)
            batch_loss = 0.0
            for micro in batch.split(train.micro_batch):
                total, _ = loss_sum(model, micro.to(device))
                scaler.scale(total / n_targets).backward()
                batch_loss += total.item()
            scaler.step(opt)
            scaler.update()
            step += 1
            tokens += n_tokens(batch)
            targets_seen += n_targets
            loss_total += batch_loss
            if progress is not None:
                progress(step, total_steps, batch_loss / n_targets)

    while time.time() - t0 < train.min_seconds:  # test hook: a slower (simulated) card
        time.sleep(min(0.5, train.min_seconds - (time.time() - t0)))
        if progress is not None:  # lets the caller stop a run whose lease is gone
            progress(step, total_steps, loss_total / max(1, targets_seen))
    state = get_peft_model_state_dict(model)
    adapter = from_peft_state_dict(state, rank=lora.rank, alpha=lora.alpha)
    result = TrainResult(
        tokens=tokens, train_loss=loss_total / targets_seen, steps=step, seconds=time.time() - t0
    )
    return adapter, result
