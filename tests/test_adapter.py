"""The adapter file format: safetensors only, canonical bytes, clear refusals."""

from __future__ import annotations

import pickle

import pytest
import torch

from nomoat import adapter as fmt


def sample(rank: int = 4, **meta: str) -> fmt.Adapter:
    g = torch.Generator().manual_seed(0)
    factors = {f"model.layers.{i}.self_attn.q_proj": (torch.randn(rank, 16, generator=g), torch.randn(8, rank, generator=g))
               for i in range(3)}
    return fmt.Adapter(factors, rank=rank, alpha=2.0 * rank, meta=meta)


def test_round_trip_keeps_factors_rank_alpha_and_meta():
    a = sample(job="j-1")
    b = fmt.from_bytes(fmt.to_bytes(a))
    assert (b.rank, b.alpha, b.scale, b.meta) == (4, 8.0, 2.0, {"job": "j-1"})
    for module, (fa, fb) in a.factors.items():
        assert torch.equal(b.factors[module][0], fa) and torch.equal(b.factors[module][1], fb)


def test_equal_adapters_serialize_to_equal_bytes():
    # uploads are idempotent per sha256, so equal adapters must hash equal
    assert len({fmt.to_bytes(sample(z="1", a="2", m="3")) for _ in range(10)}) == 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "too short"),
        (pickle.dumps({"lora_A": [1.0]}), "not safetensors"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}", "not JSON"),
    ],
)
def test_non_safetensors_bytes_are_refused(data, message):
    with pytest.raises(fmt.AdapterFormatError, match=message):
        fmt.from_bytes(data)


def test_declared_rank_must_match_the_shapes():
    a = sample()
    a.rank = 8
    with pytest.raises(fmt.AdapterFormatError, match="differs from the declared rank 8"):
        fmt.from_bytes(fmt.to_bytes(a))


def test_integer_tensors_are_refused():
    from safetensors.torch import save

    data = save({"m.lora_A": torch.zeros(2, 3, dtype=torch.int64), "m.lora_B": torch.zeros(3, 2)},
                metadata={"format": fmt.FORMAT, "kind": "adapter", "rank": "2", "alpha": "4"})
    with pytest.raises(fmt.AdapterFormatError, match="only float types"):
        fmt.from_bytes(data)
