"""The memory planner: shapes from configs, the estimate's behaviour, plans for real cards, and a
check of the estimate against what a tiny LoRA-wrapped Llama really keeps on the CPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nomoat.card import Card
from nomoat.memory import ModelShape, estimate, estimate_peak_bytes, min_vram_gb
from worker.planner import DoesNotFit, Plan, plan
from worker.probe import parse_simulated

TINY = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000)

# Published shapes, so the table below reads like the cards and models people have.
LLAMA_1B = ModelShape.from_config(LlamaConfig(  # TinyLlama-1.1B
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
    num_key_value_heads=4, vocab_size=32000))
LLAMA_7B = ModelShape.from_config(LlamaConfig(  # Llama-2-7B
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, vocab_size=32000))


def cuda_card(vram_gb: float, bf16: bool = True) -> Card:
    """A CUDA card as probe() would describe it (this machine has none)."""
    return Card(f"test card {vram_gb} GB", vram_gb, vram_gb, "8.6" if bf16 else "7.5", bf16, True,
                "cuda", 20.0)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("extra", [{}, {"attention_bias": True, "mlp_bias": True},
                                   {"head_dim": 48}])
def test_from_config_counts_parameters_exactly(tied, extra):
    config = LlamaConfig(**TINY, tie_word_embeddings=tied, **extra)
    real = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    shape = ModelShape.from_config(config)
    assert shape.n_params == real
    assert (shape.n_layers, shape.hidden, shape.n_kv_heads, shape.tied_embeddings) == (
        4, 128, 2, tied)


def test_from_config_fills_in_missing_fields_and_names_absent_ones():
    class GptStyle:  # GPT-2 names, no kv heads, no MLP width
        n_embd, n_layer, n_head, vocab_size, n_inner = 64, 2, 4, 100, None

    shape = ModelShape.from_config(GptStyle())
    assert (shape.intermediate, shape.n_kv_heads) == (256, 4)

    class NoVocab:
        hidden_size, num_hidden_layers, num_attention_heads = 64, 2, 4

    with pytest.raises(ValueError, match="vocab_size"):
        ModelShape.from_config(NoVocab())


def peak(**kw) -> int:
    args = dict(shape=LLAMA_1B, lora_rank=8, n_target_modules_per_layer=7, seq_len=512,
                micro_batch=2, precision="bf16", gradient_checkpointing=False, quantization=None)
    args.update(kw)
    return estimate_peak_bytes(**args)


def test_estimate_grows_with_micro_batch_and_seq_len():
    by_batch = [peak(micro_batch=m) for m in (1, 2, 4, 8)]
    by_seq = [peak(seq_len=s) for s in (128, 512, 2048, 8192)]
    assert by_batch == sorted(by_batch) and len(set(by_batch)) == 4
    assert by_seq == sorted(by_seq) and len(set(by_seq)) == 4


def test_checkpointing_and_quantization_shrink_the_estimate():
    assert peak(gradient_checkpointing=True) < peak()
    assert peak(quantization="4bit") < peak(quantization="8bit") < peak()
    assert peak(precision="fp32") > peak(precision="bf16") == peak(precision="fp16")
    assert peak(n_target_modules_per_layer=2) < peak() < peak(lora_rank=64)


def test_eager_attention_keeps_the_scores():
    sdpa = estimate(LLAMA_1B, 8, 7, 4096, 1, "bf16", False, None)
    eager = estimate(LLAMA_1B, 8, 7, 4096, 1, "bf16", False, None, attention="eager")
    # 22 layers x 32 heads x 4096^2 scores x 6 bytes: tens of GB at this length.
    assert eager.activations - sdpa.activations > 22 * 32 * 4096**2 * 6


def test_quantization_is_refused_off_cuda():
    with pytest.raises(ValueError, match="needs CUDA"):
        peak(quantization="4bit", precision="fp32", backend="cpu")


def test_big_card_runs_the_whole_batch_at_once():
    p = plan(LLAMA_1B, 8, 7, 512, 8, cuda_card(24))
    assert p == Plan(8, 1, "bf16", False, None, p.est_peak_gb)
    assert p.est_peak_gb <= 24 * 0.85


def test_small_card_accumulates_and_checkpoints():
    p = plan(LLAMA_1B, 8, 7, 2048, 8, cuda_card(6, bf16=False))
    assert p.precision == "fp16"
    assert p.micro_batch < 8 and p.micro_batch * p.grad_accum == 8
    assert p.gradient_checkpointing and p.quantization is None


def test_7b_does_not_fit_6gb_without_quantization():
    with pytest.raises(DoesNotFit) as err:
        plan(LLAMA_7B, 8, 7, 512, 8, cuda_card(6), allow_quantization=False)
    message = str(err.value)
    assert "needs" in message and "6 GB" in message and "card with at least" in message
    assert err.value.needed_gb > err.value.usable_gb


def test_7b_fits_8gb_in_4bit():
    p = plan(LLAMA_7B, 8, 7, 512, 8, cuda_card(8))
    assert p.quantization == "4bit" and p.gradient_checkpointing


def test_does_not_fit_suggests_quantization_when_it_would_help():
    with pytest.raises(DoesNotFit, match="allowing 4-bit quantization"):
        plan(LLAMA_7B, 8, 7, 512, 8, cuda_card(12), allow_quantization=False)


@pytest.mark.parametrize(
    "shape, vram_gb, seq_len, expected",
    [
        # expected: (micro_batch, checkpointing, quantization), or None when nothing fits
        (LLAMA_1B, 6, 512, (1, False, None)),
        (LLAMA_1B, 6, 2048, (1, True, None)),
        (LLAMA_1B, 12, 512, (2, False, None)),
        (LLAMA_1B, 12, 2048, (4, True, None)),
        (LLAMA_1B, 24, 512, (8, False, None)),
        (LLAMA_1B, 24, 2048, (2, False, None)),
        (LLAMA_7B, 6, 512, None),
        (LLAMA_7B, 8, 512, (2, True, "4bit")),
        # 4-bit with the full micro-batch, not 8-bit: the trainer loads no 8-bit base (issue 11)
        (LLAMA_7B, 12, 512, (1, False, "4bit")),
        (LLAMA_7B, 12, 2048, (1, True, "4bit")),
        (LLAMA_7B, 24, 512, (1, False, None)),
        (LLAMA_7B, 24, 2048, (2, True, None)),
    ],
)
def test_plan_table(shape, vram_gb, seq_len, expected):
    card = cuda_card(vram_gb)
    if expected is None:
        with pytest.raises(DoesNotFit):
            plan(shape, 8, 7, seq_len, 8, card)
        return
    p = plan(shape, 8, 7, seq_len, 8, card)
    assert (p.micro_batch, p.gradient_checkpointing, p.quantization) == expected
    assert p.micro_batch * p.grad_accum == 8
    assert p.est_peak_gb <= vram_gb * 0.85


def test_the_planner_plans_only_quantizations_the_trainer_loads():
    from worker.planner import TRAINABLE_QUANTIZATIONS
    from worker.trainer import QUANTIZATIONS

    assert set(TRAINABLE_QUANTIZATIONS) <= set(QUANTIZATIONS)
    planned = set()
    for shape in (LLAMA_1B, LLAMA_7B):
        for vram in (4, 6, 8, 10, 12, 16, 24):
            for seq_len in (256, 512, 1024, 2048):
                try:
                    planned.add(plan(shape, 8, 7, seq_len, 8, cuda_card(vram)).quantization)
                except DoesNotFit:
                    pass
    assert "4bit" in planned and planned <= {None, *TRAINABLE_QUANTIZATIONS}


def test_simulated_cards_plan_fp32_without_quantization():
    p = plan(LLAMA_1B, 8, 7, 256, 4, parse_simulated("RTX 4090:24"))
    assert p.precision == "fp32" and p.quantization is None
    with pytest.raises(DoesNotFit):
        plan(LLAMA_7B, 8, 7, 512, 8, parse_simulated("RTX 3060:12"))


def test_micro_batch_divides_odd_batch_sizes():
    p = plan(LLAMA_1B, 8, 7, 512, 12, cuda_card(24))
    assert 12 % p.micro_batch == 0 and p.micro_batch * p.grad_accum == 12
    assert plan(LLAMA_1B, 8, 7, 512, 7, cuda_card(24)).micro_batch == 1


@pytest.mark.parametrize("backend, shape", [("cuda", LLAMA_7B), ("cuda", LLAMA_1B),
                                            ("cpu", LLAMA_1B)])
def test_min_vram_is_enough_for_a_plan(backend, shape):
    need = min_vram_gb(shape, 8, 7, 1024, backend)
    card = Card("just enough", need, need, "", backend == "cuda", backend == "cuda", backend, 1.0)
    plan(shape, 8, 7, 1024, 8, card)  # fits
    smaller = Card("just short", need - 0.05, need, "", card.bf16, card.fp16, backend, 1.0)
    with pytest.raises(DoesNotFit):
        plan(shape, 8, 7, 1024, 8, smaller)


def test_min_vram_without_quantization_is_larger():
    assert min_vram_gb(LLAMA_7B, 8, 7, 1024, allow_quantization=False) > min_vram_gb(
        LLAMA_7B, 8, 7, 1024)


@pytest.mark.parametrize("precision, n_targets", [("fp32", 7), ("bf16", 7), ("bf16", 2)])
def test_activation_estimate_matches_what_autograd_saves(precision, n_targets):
    """The activation and logit terms against the tensors autograd really keeps for backward
    in a tiny LoRA Llama: exact accounting, so a tight bound (the estimate errs high)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LlamaConfig(**TINY)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    targets = ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(LlamaForCausalLM(config).to(dtype),
                           LoraConfig(r=8, target_modules=targets[:n_targets], lora_dropout=0.0))
    model.train()
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, config.vocab_size, (2, 64))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(input_ids=ids, labels=ids)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weights |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    saved = sum(n for ptr, n in storages.items() if ptr not in weights)

    e = estimate(ModelShape.from_config(config), 8, n_targets, 64, 2, precision, False, None,
                 backend="cpu")
    # What is saved: every layer's tensors (not the extra layer of gradients the estimate adds
    # for backward) and log_softmax's fp32 output (not the logits and gradients around it).
    layer = (e.activations - 2 * 64 * 128 * 4) // (config.num_hidden_layers + 1)
    predicted = 2 * 64 * 128 * 4 + config.num_hidden_layers * layer + 2 * 64 * 1000 * 4
    assert 0.85 * predicted <= saved <= 1.05 * predicted


_MEASURE_PEAK = textwrap.dedent("""
    import json, sys, torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0); torch.set_num_threads(1)
    config = LlamaConfig(**json.loads(sys.argv[1]))
    model = get_peft_model(LlamaForCausalLM(config),
                           LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0))
    if sys.argv[2] == "gc":
        model.gradient_checkpointing_enable(); model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, config.vocab_size, (4, 256))
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    before = status("VmRSS")
    out = model(input_ids=ids, labels=ids)
    out.loss.backward(); opt.step()
    print(status("VmHWM") - before)
""")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_estimate_is_plausible_against_peak_rss(checkpointing):
    """Peak RSS growth over one forward, backward and AdamW step of a tiny LoRA Llama on the
    CPU, against the terms that are not resident beforehand. A sanity check (malloc keeps freed
    memory, RSS is noisy): within a factor of 2. The precise check runs on a GPU."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    import json

    config = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=8000)
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE_PEAK, json.dumps(config),
         "gc" if checkpointing else "no"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    grown = int(result.stdout.strip().splitlines()[-1])
    e = estimate(ModelShape.from_config(LlamaConfig(**config)), 8, 7, 256, 4, "fp32",
                 checkpointing, None, backend="cpu")
    predicted = e.activations + e.logits + e.lora
    assert predicted / 2 <= grown <= predicted * 2, (grown, predicted)
