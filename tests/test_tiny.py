"""The packaged tiny model and the packing/loss helpers every side evaluates with."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nomoat.packing import PAD, inputs, mean_loss, n_tokens, pack
from nomoat.tiny import read_demo, read_fortunes, tiny_model_path

SEQ_LEN = 128


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tiny_model_path())


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(tiny_model_path())


def test_folder_is_a_small_float32_llama(model, tokenizer):
    files = {p.name: p.stat().st_size for p in tiny_model_path().iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert sum(files.values()) < 5_000_000
    assert model.config.model_type == "llama"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.vocab_size == len(tokenizer) == 2048
    assert model.config.eos_token_id == tokenizer.eos_token_id is not None
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    names = {name.rsplit(".", 1)[-1] for name in linears}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names


def test_tokenizer_round_trips_any_text(tokenizer):
    text = "naïve café — \t tabs, ünïcödé and bytes \x00 ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_demo_corpus_is_nearly_disjoint_from_pretraining():
    # Debian files a handful of fortunes under two categories; 13 of the demo's ~1,950 texts
    # also appear in the pretraining text.
    demo = read_demo()
    shared = set(demo) & set(read_fortunes())
    assert len(shared) < 0.01 * len(demo)


def test_held_out_demo_loss_is_well_below_uniform(model, tokenizer):
    blocks = pack(tokenizer, read_demo()[-200:], SEQ_LEN)
    loss = mean_loss(model, blocks)
    assert loss < math.log(len(tokenizer)) - 2.0, loss


def test_pack_appends_eos_and_pads_a_short_text(tokenizer):
    ids = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    blocks = pack(tokenizer, ["hello world"], SEQ_LEN)
    assert blocks.shape == (1, SEQ_LEN) and blocks.dtype == torch.long
    assert blocks[0, : len(ids) + 1].tolist() == ids + [tokenizer.eos_token_id]
    assert (blocks[0, len(ids) + 1 :] == PAD).all()
    assert n_tokens(blocks) == len(ids) + 1
    assert inputs(blocks).min() >= 0


def test_pack_loses_no_token_across_blocks(tokenizer):
    texts = read_demo()[:50]
    blocks = pack(tokenizer, texts, 16)
    expected = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    assert n_tokens(blocks) == expected
    assert (blocks[:-1] != PAD).all()  # only the last block is padded
    assert (blocks == tokenizer.eos_token_id).sum() == len(texts)


def test_pack_treats_special_token_text_as_data(tokenizer):
    blocks = pack(tokenizer, ["a <|eos|> b"], SEQ_LEN)
    assert (blocks == tokenizer.eos_token_id).sum() == 1


@pytest.mark.parametrize(
    ("texts", "seq_len", "error"),
    [([], SEQ_LEN, ValueError), ("just one string", SEQ_LEN, TypeError), (["x"], 1, ValueError)],
)
def test_pack_rejects_bad_input_clearly(tokenizer, texts, seq_len, error):
    with pytest.raises(error, match="text|seq_len"):
        pack(tokenizer, texts, seq_len)


def test_mean_loss_of_a_short_text_matches_transformers(model, tokenizer):
    blocks = pack(tokenizer, ["The quick brown fox."], SEQ_LEN)
    real = blocks[:, : n_tokens(blocks)]
    with torch.no_grad():
        expected = model(input_ids=real, labels=real).loss.item()
    assert mean_loss(model, blocks) == pytest.approx(expected, rel=1e-5)


def test_mean_loss_does_not_depend_on_batch_size_and_keeps_mode(model, tokenizer):
    blocks = pack(tokenizer, read_demo()[:40], 32)
    model.train()
    a, b = mean_loss(model, blocks, batch_size=1), mean_loss(model, blocks, batch_size=64)
    assert a == pytest.approx(b, rel=1e-5)
    assert model.training
    model.eval()


def test_mean_loss_without_targets_raises(model):
    with pytest.raises(ValueError, match="no next-token targets"):
        mean_loss(model, torch.tensor([[5] + [PAD] * 7]))
    with pytest.raises(ValueError, match="non-empty"):
        mean_loss(model, torch.empty(0, 8, dtype=torch.long))
