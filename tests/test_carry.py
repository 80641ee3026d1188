"""A warm-start job's carry on the worker's disk (worker/carry.py): kept per (lineage, job),
read back exactly, and a damaged one dropped (the task then starts fresh)."""

from __future__ import annotations

from pathlib import Path

import torch

from nomoat.adapter import Adapter
from worker.carry import CarryStore
from worker.trainer import Carry


def carry(seed: int) -> Carry:
    g = torch.Generator().manual_seed(seed)
    factors = Adapter({"m.q_proj": (torch.randn(2, 4, generator=g), torch.randn(3, 2, generator=g))}, rank=2, alpha=4.0)
    moments = {"base_model.model.m.q_proj.lora_A.default.weight": {"step": torch.tensor(3.0),
                                                                    "exp_avg": torch.randn(2, 4, generator=g)}}
    return Carry(factors, moments)


def test_a_carry_is_kept_per_lineage_and_job_and_read_back_exactly(tmp_path: Path) -> None:
    store = CarryStore(tmp_path)
    assert store.load("lin-a", "j-1") is None
    store.save("lin-a", "j-1", carry(1))
    store.save("lin-b", "j-1", carry(2))  # another coordinator's job of the same name
    back = store.load("lin-a", "j-1")
    want = carry(1)
    assert torch.equal(back.factors.factors["m.q_proj"][0], want.factors.factors["m.q_proj"][0])
    (name,) = want.optimizer_state
    assert all(torch.equal(back.optimizer_state[name][k], v) for k, v in want.optimizer_state[name].items())
    assert not torch.equal(store.load("lin-b", "j-1").factors.factors["m.q_proj"][0], want.factors.factors["m.q_proj"][0])
    assert store.load("lin-a", "j-2") is None


def test_a_damaged_carry_is_dropped(tmp_path: Path) -> None:
    store = CarryStore(tmp_path)
    store.save("lin", "j-1", carry(1))
    (factors,) = tmp_path.glob("*.adapter")
    factors.write_bytes(b"not an adapter")
    assert store.load("lin", "j-1") is None
    assert not list(tmp_path.iterdir())  # both files gone: the next task starts fresh and saves anew
