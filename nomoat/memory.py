"""The memory model: the peak memory of one LoRA training step, from the model's shape.

Pure functions over shapes; nothing here touches a device. Both sides use it: the coordinator
asks ``min_vram_gb`` what a task needs (it becomes the task's Ray ``vram_gb`` request), and the
worker's planner (``worker.planner``) asks ``estimate_peak_bytes`` which plan fits its card.

    >>> from transformers import LlamaConfig
    >>> shape = ModelShape.from_config(LlamaConfig(hidden_size=2048, intermediate_size=5632,
    ...     num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000))
    >>> need = min_vram_gb(shape, lora_rank=8, n_target_modules_per_layer=7, seq_len=1024)

The estimate models what a Hugging Face Llama-style decoder under PEFT LoRA keeps alive at the
peak of a training step (the loss backward); ``estimate`` returns it term by term. Assumptions,
which the trainer should keep true or this module should learn about:

- the frozen base is loaded in the compute dtype (or quantized by bitsandbytes, which leaves the
  embeddings, norms and ``lm_head`` in the compute dtype); the LoRA factors are fp32 (PEFT's
  default ``autocast_adapter_dtype``) and trained with AdamW;
- attention is ``sdpa`` (the transformers default), whose fused kernels keep O(seq) per head
  rather than the seq x seq scores; pass ``attention="eager"`` to plan for the latter;
- the loss is computed from full fp32 logits (transformers' ``ForCausalLMLoss``);
- ``lora_dropout`` is 0 (a dropout would keep one more copy of every target's input).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

GiB = 2**30

PRECISIONS = ("fp32", "bf16", "fp16")
QUANTIZATIONS = (None, "8bit", "4bit")
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# Bytes per quantized weight, scales included. int8: one byte plus an fp32 scale per output row
# (negligible). NF4: half a byte plus an fp32 absmax per 64-weight block; double quantization
# would shave that to ~0.016, but we do not count on the trainer turning it on.
_QUANT_BYTES = {"8bit": 1.0, "4bit": 0.5 + 4 / 64}

# What is resident before the first tensor: the CUDA context, cuBLAS/cuDNN workspaces and kernel
# images (0.3 to 0.8 GB depending on driver and card), or torch's own libraries on the CPU.
_FIXED_OVERHEAD = {"cuda": 0.8 * GiB, "mps": 0.5 * GiB, "cpu": 0.5 * GiB}
# The caching allocator rounds blocks up and fragments as activation sizes vary per layer; on
# the CPU, malloc keeps freed blocks mapped (measured: peak RSS grows ~1.3x the live tensors).
_FRAGMENTATION = {"cuda": 0.10, "mps": 0.10, "cpu": 0.30}

# The order target modules are assumed to be chosen in, when only their number is known: PEFT's
# Llama default (q, v), then the rest of attention, then the MLP ("all-linear" is all seven).
_TARGET_ORDER = ("q", "v", "k", "o", "gate", "up", "down")

# fp32 LoRA weight + its fp32 gradient + AdamW's two fp32 moments.
_LORA_BYTES_PER_PARAM = 4 + 4 + 8


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder that memory depends on."""

    n_params: int
    n_layers: int
    hidden: int
    intermediate: int
    vocab: int
    n_heads: int
    n_kv_heads: int
    head_dim: int = 0  # 0: hidden // n_heads
    tied_embeddings: bool = False

    @property
    def attn_dim(self) -> int:
        """Width of the query (and attention output) projection."""
        return self.n_heads * (self.head_dim or self.hidden // self.n_heads)

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * (self.head_dim or self.hidden // self.n_heads)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer in one decoder layer."""
        h, q, kv, i = self.hidden, self.attn_dim, self.kv_dim, self.intermediate
        return {
            "q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h),
            "gate": (h, i), "up": (h, i), "down": (i, h),
        }

    @property
    def n_linear_params(self) -> int:
        """Parameters in the decoder layers' linear weights: what quantization shrinks."""
        return self.n_layers * sum(a * b for a, b in self.linear_shapes().values())

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Read a transformers config (Llama names first, GPT-style names as fallbacks)."""
        if hasattr(config, "get_text_config"):  # multimodal configs nest the decoder's
            config = config.get_text_config()
        hidden = _field(config, "hidden_size", "n_embd", "d_model")
        n_layers = _field(config, "num_hidden_layers", "n_layer", "num_layers")
        n_heads = _field(config, "num_attention_heads", "n_head", "num_heads")
        vocab = _field(config, "vocab_size")
        n_kv = _field(config, "num_key_value_heads", "num_kv_heads", default=n_heads)
        # GPT-style configs leave the MLP width unset to mean 4x hidden.
        intermediate = _field(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
        head_dim = _field(config, "head_dim", default=hidden // n_heads)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        shape = cls(0, n_layers, hidden, intermediate, vocab, n_heads, n_kv, head_dim, tied)

        per_layer = sum(a * b for a, b in shape.linear_shapes().values()) + 2 * hidden  # 2 norms
        if getattr(config, "attention_bias", False):
            per_layer += shape.attn_dim + 2 * shape.kv_dim + hidden
        if getattr(config, "mlp_bias", False):
            per_layer += 2 * intermediate + hidden
        embeddings = vocab * hidden * (1 if tied else 2)  # input embedding, and lm_head if untied
        n_params = embeddings + n_layers * per_layer + hidden  # + the final norm
        return cls(n_params, n_layers, hidden, intermediate, vocab, n_heads, n_kv, head_dim, tied)


def _field(config: Any, *names: str, default: int | None = None) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    if default is None:
        raise ValueError(
            f"The model config has none of {', '.join(names)}; the planner needs it to size the "
            "task. Use a Llama-style decoder config, or build a ModelShape by hand."
        )
    return default


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one training step, in bytes, term by term."""

    base_weights: int
    quant_workspace: int
    lora: int
    activations: int
    logits: int
    overhead: int

    @property
    def total(self) -> int:
        return (self.base_weights + self.quant_workspace + self.lora + self.activations
                + self.logits + self.overhead)


def estimate(
    shape: ModelShape,
    lora_rank: int,
    n_target_modules_per_layer: int,
    seq_len: int,
    micro_batch: int,
    precision: str,
    gradient_checkpointing: bool,
    quantization: str | None,
    *,
    backend: str = "cuda",
    attention: str = "sdpa",
) -> MemoryEstimate:
    """The estimate of ``estimate_peak_bytes``, term by term."""
    _check_args(lora_rank, n_target_modules_per_layer, seq_len, micro_batch, precision,
                quantization, backend, attention)
    c = _DTYPE_BYTES[precision]
    tokens = micro_batch * seq_len
    targets = _targets(shape, n_target_modules_per_layer)

    if quantization is None:
        base = shape.n_params * c
        workspace = 0
    else:
        base = int(shape.n_linear_params * _QUANT_BYTES[quantization]
                   + (shape.n_params - shape.n_linear_params) * c)
        # Every quantized matmul (forward and backward) first dequantizes its weight to the
        # compute dtype; the largest one bounds that temporary.
        workspace = max(a * b for a, b in shape.linear_shapes().values()) * c

    lora_params = shape.n_layers * lora_rank * sum(a + b for a, b in targets)
    lora = lora_params * _LORA_BYTES_PER_PARAM

    layer = _layer_activation_bytes_per_token(shape, lora_rank, targets, c, seq_len, attention)
    if gradient_checkpointing:
        # Only each layer's input survives the forward; backward recomputes one layer at a time,
        # so one layer's activations plus their gradients are live at once.
        activations = tokens * (shape.n_layers * shape.hidden * c + 2 * layer)
    else:
        # Every layer keeps its saved tensors until backward reaches it; the layer being
        # differentiated also holds gradients of about the same size.
        activations = tokens * (shape.n_layers + 1) * layer
    # The final norm keeps an fp32 copy of its input, as the layers' norms do.
    activations += tokens * shape.hidden * 4

    # The loss upcasts logits to fp32 (tokens x vocab, which for small models outweighs all
    # layers together). Live at the peak (the loss backward): the model's logits (c bytes),
    # log_softmax's saved fp32 output, the fp32 gradient coming from nll_loss, and the fp32
    # gradient log_softmax's backward is writing.
    logits = tokens * shape.vocab * (c + 12)

    overhead = _FIXED_OVERHEAD[backend] + _FRAGMENTATION[backend] * (activations + logits)
    return MemoryEstimate(int(base), int(workspace), int(lora), int(activations), int(logits),
                          int(overhead))


def _layer_activation_bytes_per_token(
    shape: ModelShape, rank: int, targets: list[tuple[int, int]], c: int, seq_len: int,
    attention: str,
) -> int:
    """Bytes one decoder layer saves for backward, per token.

    The base weights are frozen, so autograd saves no inputs for their weight gradients; what it
    saves is what the gradient flowing back to the LoRA factors of lower layers needs.
    """
    h, q, i = shape.hidden, shape.attn_dim, shape.intermediate
    # Two RMSNorms, each computing in fp32 from an fp32 copy of its input.
    norms = 2 * 4 * h
    # SDPA keeps q, k and v (k, v repeated to all query heads) and its output, plus an fp32
    # logsumexp per head.
    attn = 4 * q * c + 4 * shape.n_heads
    if attention == "eager":
        # Eager softmax runs in fp32 and keeps its output; the matmul with v keeps a copy in c.
        attn += shape.n_heads * seq_len * (4 + c)
    # SiLU keeps its input; the gate * up product keeps both factors.
    mlp = 3 * i * c
    # LoRA's A keeps its input: PEFT casts each target's input to fp32 (a separate copy per
    # target when the base computes in 16 bits); B keeps A's rank-r output.
    if c == 4:
        distinct_inputs = {d_in for d_in, _ in targets}  # q/k/v share one input, gate/up another
        lora_inputs = 4 * sum(distinct_inputs)
    else:
        lora_inputs = 4 * sum(d_in for d_in, _ in targets)
    lora = lora_inputs + 4 * rank * len(targets)
    return norms + attn + mlp + lora


def _targets(shape: ModelShape, n: int) -> list[tuple[int, int]]:
    shapes = shape.linear_shapes()
    return [shapes[name] for name in _TARGET_ORDER[:n]]


def _check_args(rank: int, n_targets: int, seq_len: int, micro_batch: int, precision: str,
                quantization: str | None, backend: str, attention: str) -> None:
    if rank < 1:
        raise ValueError(f"lora_rank is {rank}; it must be at least 1.")
    if not 1 <= n_targets <= len(_TARGET_ORDER):
        raise ValueError(
            f"n_target_modules_per_layer is {n_targets}; a Llama-style layer has 1 to "
            f"{len(_TARGET_ORDER)} linear modules to put LoRA on."
        )
    if seq_len < 1 or micro_batch < 1:
        raise ValueError(f"seq_len ({seq_len}) and micro_batch ({micro_batch}) must be at least 1.")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}.")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not one of None, '8bit', '4bit'.")
    if backend not in _FIXED_OVERHEAD:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(_FIXED_OVERHEAD)}.")
    if quantization is not None and backend != "cuda":
        raise ValueError(
            f"{quantization} quantization needs CUDA (bitsandbytes); backend {backend!r} "
            "can only train unquantized."
        )
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"attention {attention!r} is not 'sdpa' or 'eager'.")


def estimate_peak_bytes(
    shape: ModelShape,
    lora_rank: int,
    n_target_modules_per_layer: int,
    seq_len: int,
    micro_batch: int,
    precision: str,
    gradient_checkpointing: bool,
    quantization: str | None,
    *,
    backend: str = "cuda",
    attention: str = "sdpa",
) -> int:
    """Peak bytes one training step (forward, backward, AdamW step) needs on the device."""
    return estimate(shape, lora_rank, n_target_modules_per_layer, seq_len, micro_batch,
                    precision, gradient_checkpointing, quantization, backend=backend,
                    attention=attention).total


def min_vram_gb(
    shape: ModelShape,
    lora_rank: int,
    n_target_modules_per_layer: int,
    seq_len: int,
    backend: str = "cuda",
    *,
    headroom: float = 0.15,
    allow_quantization: bool = True,
    attention: str = "sdpa",
) -> float:
    """The VRAM a card needs for the task's smallest plan: what the task asks Ray for.

    Includes the headroom, so ``plan`` succeeds on any card advertising at least this much.
    """
    quantization = "4bit" if allow_quantization and backend == "cuda" else None
    precision = "fp32" if backend == "cpu" else "bf16"  # fp16 needs the same bytes
    need = estimate_peak_bytes(shape, lora_rank, n_target_modules_per_layer, seq_len, 1,
                               precision, True, quantization, backend=backend, attention=attention)
    return math.ceil(need / GiB / (1 - headroom) * 100) / 100


# Shapes of real models, by name. A simulated cluster (demo, tests, benchmarks) trains the tiny
# model on the CPU but can plan memory as if it trained one of these (JobConfig.plan_model), so
# placement, fitting and out-of-memory recovery meet realistic numbers.
PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         vocab_size=128256, tie_word_embeddings=True),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                         vocab_size=128256, tie_word_embeddings=True),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                       vocab_size=32000, tie_word_embeddings=False),
}


def shape_for(plan_model: str, model_config: Any) -> ModelShape:
    """The shape to plan with: the named preset, else the model's own config."""
    if not plan_model:
        return ModelShape.from_config(model_config)
    if plan_model not in PRESET_CONFIGS:
        raise ValueError(f"plan_model {plan_model!r} is not one of {', '.join(PRESET_CONFIGS)}.")
    from types import SimpleNamespace

    return ModelShape.from_config(SimpleNamespace(**PRESET_CONFIGS[plan_model]))


