"""One training task: a base model folder and some texts in, a LoRA adapter out.

No networking here (no gRPC, Ray or Redis): the Ray task, the outbound-only worker and the tests
all call :func:`train_adapter` the same way. Read it top to bottom:

1. load the base model in float32 (on a GPU in the plan's precision, or in 4 bits: QLoRA, when
   the plan says so) and wrap it with a fresh, seeded PEFT LoRA, or, warm-started
   (``start=``), with the start factors loaded into the LoRA and ``s·B₀A₀`` subtracted from the
   base weights so the model trained on is still exactly the base version (:mod:`worker.warmstart`);
2. pack the texts into ``seq_len`` blocks (:mod:`nomoat.packing`, the same packing the
   coordinator evaluates with);
3. per epoch, shuffle the blocks with the seed and take ``batch_size`` blocks per optimizer step,
   fed through the model ``micro_batch`` at a time (gradient accumulation; at most half the batch,
   so each step has two batch sizes to measure the gradient noise from: ``result.norms``);
   AdamW at one constant learning rate for both factors;
4. return what the task contributes as an :class:`~nomoat.adapter.Adapter` (the LoRA itself, or
   for a warm start the exact rank-2r difference), with how many tokens it saw, and in
   ``result.carry`` the trained factors and AdamW's moments: what the same worker passes back as
   ``start=`` / ``optimizer_state=`` to continue the job on the next version. The carry never
   leaves the worker.

Example::

    from worker.trainer import LoraSpec, TrainSpec, train_adapter
    adapter, result = train_adapter(tiny_model_path(), texts, LoraSpec(), TrainSpec(max_steps=20))
    # the next task of the same job, on the next version, continues where this one ended:
    nxt, _ = train_adapter(next_version, more_texts, LoraSpec(), TrainSpec(max_steps=20),
                           start=result.carry.factors, optimizer_state=result.carry.optimizer_state)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

from nomoat.adapter import Adapter, from_peft_state_dict
from nomoat.packing import PAD, epoch_orders, loss_sum, n_tokens, pack
from nomoat.spec import GradientNorms
from worker import warmstart

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
    # "4bit": the frozen base is loaded in NF4 by bitsandbytes (QLoRA; CUDA only, the ``qlora``
    # extra); the LoRA factors, their training and the exported adapter are the same as unquantized.
    quantization: str | None = None
    # Test hook (simulated cards): pad the run's wall time to at least this many seconds, as a
    # slower card would take. 0 leaves it alone.
    min_seconds: float = 0.0


OptimizerState = dict[str, dict[str, torch.Tensor]]  # PEFT parameter name -> AdamW's state for it


@dataclass
class Carry:
    """What a worker keeps to continue the same job on a newer version: the trained factors
    ``(A₁, B₁)`` (the next task's ``start``) and AdamW's moments. Local to the worker: only the
    contribution is uploaded."""

    factors: Adapter
    optimizer_state: OptimizerState


@dataclass
class TrainResult:
    tokens: int  # real (non-padding) tokens fed through the model, over all steps taken
    train_loss: float  # mean next-token loss over those steps, per token
    steps: int  # optimizer steps taken
    seconds: float
    carry: Carry | None = field(default=None, repr=False)
    norms: GradientNorms = field(default_factory=GradientNorms)


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
QUANTIZATIONS = ("4bit",)  # what _lora_model can load a base in; the planner plans no other


def can_quantize(device: str) -> bool:
    """Whether this process can load a 4-bit base on ``device``: CUDA, with bitsandbytes installed."""
    import importlib.util

    return str(device).startswith("cuda") and importlib.util.find_spec("bitsandbytes") is not None


def _quantized_base(model_dir: Path, quantization: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The base in NF4 with double quantization, computing in ``dtype``, placed on ``device``."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not one the trainer loads ({', '.join(QUANTIZATIONS)})")
    if not can_quantize(device):
        raise ValueError(f"a 4-bit base needs a CUDA device and bitsandbytes (pip install 'nomoat[qlora]'); "
                         f"this task runs on {device}")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype=dtype,
                                                device_map={"": device})


def compute_dtype(precision: str, device: str) -> torch.dtype:
    """The base model's dtype: the plan's on an accelerator, fp32 on the CPU (slow and lossy in
    16 bits there)."""
    if precision not in _DTYPES:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(_DTYPES)}")
    return torch.float32 if str(device).startswith("cpu") else _DTYPES[precision]


def _lora_model(model_dir: Path, lora: LoraSpec, device: str, dtype: torch.dtype = torch.float32,
                checkpointing: bool = False, start: Adapter | None = None,
                quantization: str | None = None) -> torch.nn.Module:
    """The base model in ``dtype`` with fp32 LoRA factors on ``lora.target_modules``: fresh, or
    ``start``'s with ``s·B₀A₀`` taken off the base weights first.

    The factors are fp32 (PEFT's ``autocast_adapter_dtype``) because a small update vanishes in
    bf16 rounding (see DESIGN, folding math); PEFT draws A from torch's global generator, which
    the caller has seeded, and starts B at zero. The subtraction is done in fp32 and only then cast
    to ``dtype``, so in fp32 the warm-started model equals the base version to fp32 rounding.
    """
    if quantization is not None:
        if start is not None:  # s·B₀A₀ would have to come off weights that are already NF4
            raise ValueError("a warm start (start factors) cannot train on a 4-bit base; start from a fresh LoRA")
        base = _quantized_base(model_dir, quantization, device, dtype)
    elif start is None:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    else:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        modules = dict(base.named_modules())
        missing = sorted(m for m in start.factors if m not in modules)
        if missing:
            raise ValueError(f"the start factors name modules the model lacks (e.g. {', '.join(missing[:3])})")
        warmstart.subtract_start({m: modules[m].weight for m in start.factors}, start)
        base = base.to(dtype)
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
    model = get_peft_model(base, config)
    if start is not None:
        _load_factors(model, start, lora)
    if quantization is None:  # a 4-bit base was placed by device_map (bitsandbytes forbids .to)
        model = model.to(device)
    model.train()
    return model


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The PEFT LoRA layers by their module name in the base model."""
    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules()
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}


def _load_factors(model: torch.nn.Module, start: Adapter, lora: LoraSpec) -> None:
    layers = _lora_layers(model)
    warmstart.check_start(start, lora.rank, lora.alpha, set(layers))
    with torch.no_grad():
        for module, (a0, b0) in start.factors.items():
            layers[module].lora_A["default"].weight.copy_(a0)
            layers[module].lora_B["default"].weight.copy_(b0)


def _optimizer(model: torch.nn.Module, train: TrainSpec,
               state: OptimizerState | None) -> tuple[torch.optim.Optimizer, dict[torch.nn.Parameter, str]]:
    """AdamW over the LoRA factors; ``state`` (a previous task's moments, by parameter name) is
    loaded into it."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for _, p in named], lr=train.learning_rate, weight_decay=0.0)
    names = {p: n for n, p in named}
    if state is not None:
        if set(state) != set(names.values()):
            raise ValueError("the optimizer state is for other parameters; carry it only within one job's LoRA")
        for p, n in names.items():
            opt.state[p] = {k: v.to(p.device).clone() if v.dim() else v.clone() for k, v in state[n].items()}
    return opt, names


def _grads(params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def _sq_norm(params: Sequence[torch.nn.Parameter], before: list[torch.Tensor | None] | None,
             scale: float) -> float:
    """``|scale · (grad − before)|²`` over ``params`` (``before`` None: the gradient itself)."""
    total = 0.0
    for i, p in enumerate(params):
        if p.grad is None:
            continue
        g = p.grad.detach().float()
        if before is not None and before[i] is not None:
            g = g - before[i].float()
        total += float(g.pow(2).sum())
    return total * scale * scale


class _NormSums:
    """Running means of the two squared gradient norms, and the harmonic means of the two batch
    sizes: E|g_b|² = |G|² + tr(Σ)/b is linear in 1/b, so over batches of different sizes (a
    batch of 5 is micro-batches of 2, 2 and 1; an epoch's last batch is short) the mean norm
    belongs to the harmonic mean size."""

    def __init__(self) -> None:
        self.m_sq = self.m_inv = self.b_sq = self.b_inv = 0.0
        self.m_count = self.b_count = 0

    def micro(self, sq: float, size: int) -> None:
        self.m_sq, self.m_inv, self.m_count = self.m_sq + sq, self.m_inv + 1.0 / size, self.m_count + 1

    def batch(self, sq: float, size: int) -> None:
        self.b_sq, self.b_inv, self.b_count = self.b_sq + sq, self.b_inv + 1.0 / size, self.b_count + 1

    def result(self) -> GradientNorms:
        if not self.b_count:
            return GradientNorms()
        return GradientNorms(self.m_sq / self.m_count, self.b_sq / self.b_count,
                             self.m_count / self.m_inv, self.b_count / self.b_inv)


def train_adapter(
    model_dir: Path,
    texts: Sequence[str],
    lora: LoraSpec,
    train: TrainSpec,
    *,
    device: str = "cpu",
    progress: Progress | None = None,
    start: Adapter | None = None,
    optimizer_state: OptimizerState | None = None,
) -> tuple[Adapter, TrainResult]:
    """Train a LoRA on ``texts`` over the model in ``model_dir`` and return its contribution; the
    same inputs give the same adapter.

    ``start``: begin from these factors (same rank, alpha and modules) instead of a fresh LoRA;
    the returned adapter is then the exact difference, rank 2r (:func:`warmstart.contribution`).
    ``optimizer_state``: AdamW moments to continue from (``result.carry.optimizer_state`` of the
    task that produced ``start``)."""
    _check(lora, train)
    t0 = time.time()
    torch.manual_seed(train.seed)  # LoRA's A, and dropout if any, draw from the global generator

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    blocks = pack(tokenizer, texts, train.seq_len)
    model = _lora_model(model_dir, lora, device, compute_dtype(train.precision, device),
                        train.gradient_checkpointing, start, train.quantization)

    steps_per_epoch = math.ceil(len(blocks) / train.batch_size)
    total_steps = steps_per_epoch * train.epochs
    if train.max_steps is not None:
        total_steps = min(total_steps, train.max_steps)

    opt, names = _optimizer(model, train, optimizer_state)
    # fp16's narrow range underflows small gradients without loss scaling; bf16 and fp32 need none.
    scaler = torch.amp.GradScaler(str(device).split(":")[0],
                                  enabled=compute_dtype(train.precision, device) == torch.float16)
    orders = epoch_orders(len(blocks), train.seed)  # the folder replays it (the shard proof)
    params = [p for p in model.parameters() if p.requires_grad]
    norms = _NormSums()
    step, tokens, targets_seen, loss_total = 0, 0, 0, 0.0
    while step < total_steps:
        order = next(orders)
        for batch in (blocks[idx] for idx in order.split(train.batch_size)):
            if step == total_steps:
                break
            # Each micro-batch adds its *summed* loss divided by the whole batch's target count,
            # so the accumulated gradient is the batch mean whatever micro_batch is.
            n_targets = max(1, int((batch[:, 1:] != PAD).sum()))
            opt.zero_grad(set_to_none=True)
            batch_loss = 0.0
            # Two micro-batches per step at least: the gradient noise needs two batch sizes (the
            # same gradient, a little less memory; a batch of one sequence measures nothing).
            micros = batch.split(min(train.micro_batch, max(1, len(batch) // 2)))
            for micro in micros:
                before = _grads(params) if len(micros) > 1 else None
                total, _ = loss_sum(model, micro.to(device))
                scaler.scale(total / n_targets).backward()
                batch_loss += total.item()
                if before is not None:  # this micro-batch's own mean gradient: its share, rescaled
                    share = n_targets / max(1, int((micro[:, 1:] != PAD).sum())) / scaler.get_scale()
                    norms.micro(_sq_norm(params, before, share), len(micro))
            if len(micros) > 1:
                norms.batch(_sq_norm(params, None, 1.0 / scaler.get_scale()), len(batch))
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
    end = from_peft_state_dict(state, rank=lora.rank, alpha=lora.alpha)
    moments = {names[p]: {k: v.detach().to("cpu").clone() for k, v in s.items()} for p, s in opt.state.items()}
    result = TrainResult(
        tokens=tokens, train_loss=loss_total / targets_seen, steps=step, seconds=time.time() - t0,
        carry=Carry(end, moments), norms=norms.result(),
    )
    return warmstart.contribution(end, start), result
