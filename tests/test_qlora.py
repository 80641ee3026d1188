"""4-bit bases (QLoRA, issue 11): a base that does not fit a card in bf16 is loaded in NF4 by
bitsandbytes, and the LoRA factors and the exported adapter are what the unquantized path gives.
The CUDA tests run under the ``gpu`` marker on a machine with a card and bitsandbytes; here, the
checks that the planner and trainer agree on what can be planned."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from nomoat.card import Card
from nomoat.spec import LoraConfig, NeedsBiggerCard, TaskSpec, TrainConfig
from nomoat.tiny import read_fortunes, tiny_model_path
from worker.settings import NodeSettings
from worker.probe import ray_labels
from worker.task import memory_plan
from worker.trainer import LoraSpec, TrainSpec, can_quantize, train_adapter

CUDA = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


def test_a_4bit_task_off_cuda_is_refused_with_a_sentence() -> None:
    with pytest.raises(ValueError, match="needs a CUDA device and bitsandbytes"):
        train_adapter(tiny_model_path(), read_fortunes()[:8], LoraSpec(rank=2),
                      TrainSpec(max_steps=1, quantization="4bit"))
    assert not can_quantize("cpu")


def _spec(card: Card) -> TaskSpec:
    return TaskSpec(task_id="t", job_id="j", fence=1, base_version=0, tokens=4096, coordinator="127.0.0.1:1",
                    token="", lora=LoraConfig(8, 16.0, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj")),
                    train=TrainConfig(seq_len=512, batch_size=8, learning_rate=1e-3, epochs=1, seed=0,
                                      plan_model="llama-2-7b"),
                    lease_ttl_s=60, card=card)


def _card(simulated: bool) -> Card:
    return Card(name="RTX 3060", vram_gb=12, free_vram_gb=12, compute_capability="8.6", bf16=True, fp16=True,
                backend="cpu" if simulated else "cuda", tflops=12.0, simulated=simulated)


def test_a_simulated_card_never_plans_a_4bit_base(tmp_path) -> None:
    # A simulated card plans as the CUDA card it stands for but trains on the CPU, where there is
    # no 4-bit path: a 7B task on a simulated 12 GB card needs a bigger card, not NF4.
    with pytest.raises(NeedsBiggerCard):
        memory_plan(_spec(_card(simulated=True)), _card(simulated=True), None, NodeSettings(cache_dir=tmp_path))


def test_a_real_small_card_with_bitsandbytes_trains_the_base_in_4_bits(tmp_path, monkeypatch) -> None:
    # Fake: there is no CUDA card or bitsandbytes here, so the capability check says yes.
    monkeypatch.setattr("worker.task.can_quantize", lambda device: True)
    chosen, train = memory_plan(_spec(_card(simulated=False)), _card(simulated=False), None,
                                NodeSettings(cache_dir=tmp_path))
    assert chosen.quantization == "4bit" and train.quantization == "4bit"
    monkeypatch.setattr("worker.task.can_quantize", lambda device: False)  # without bitsandbytes
    with pytest.raises(NeedsBiggerCard):
        memory_plan(_spec(_card(simulated=False)), _card(simulated=False), None, NodeSettings(cache_dir=tmp_path))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA card and bitsandbytes (pip install 'nomoat[qlora]')")
def test_a_4bit_base_trains_the_same_adapter_shape_as_bf16() -> None:
    texts = read_fortunes()[:64]
    lora = LoraSpec(rank=4, alpha=8.0)
    plain, r_plain = train_adapter(tiny_model_path(), texts, lora, TrainSpec(max_steps=8, precision="bf16"),
                                   device="cuda")
    quant, r_quant = train_adapter(tiny_model_path(), texts, lora,
                                   TrainSpec(max_steps=8, precision="bf16", quantization="4bit"), device="cuda")
    assert set(quant.factors) == set(plain.factors)
    for m, (a, b) in quant.factors.items():
        assert a.shape == plain.factors[m][0].shape and b.shape == plain.factors[m][1].shape
        assert a.dtype == torch.float32 and b.dtype == torch.float32 and torch.isfinite(b).all()
        assert b.abs().sum() > 0  # it trained
    assert (quant.rank, quant.alpha) == (plain.rank, plain.alpha)
    assert abs(r_quant.train_loss - r_plain.train_loss) < 0.5  # NF4 costs a little, not a different model


def test_a_card_here_claims_no_4bit_base() -> None:
    from worker.probe import probe

    assert not probe().loads_4bit  # no CUDA card here: the trainer has no 4-bit path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA card")
def test_a_cuda_card_claims_a_4bit_base_exactly_when_bitsandbytes_is_there() -> None:
    from worker.probe import probe

    card = probe()
    assert card.loads_4bit == (importlib.util.find_spec("bitsandbytes") is not None)
    assert ray_labels(card)["nomoat/loads-4bit"] == ("true" if card.loads_4bit else "false")
