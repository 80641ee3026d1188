"""Held-out evaluation (issue 11): a token budget, paired comparisons, and candidates evaluated as
a side path that neither copies nor changes the fp32 master. On the tiny model, for real."""

from __future__ import annotations

import json
import time

import pytest
import torch

from nomoat import evaluation
from coordinator.fold.folder import Folder
from coordinator.model.history import History
from coordinator.ledger import VersionRecord
from coordinator.model.running import RunningModel
from coordinator.settings import JobDefaults, Settings
from coordinator.model.store import BlobStore
from coordinator.schedule.submit import submit
from nomoat import adapter as fmt
from nomoat import evaluation as shared
from nomoat import lora
from nomoat.tiny import read_demo, tiny_model_path

TEXTS = read_demo()[:120]


@pytest.fixture(scope="module")
def model() -> RunningModel:
    return RunningModel(tiny_model_path())


def adapter(model: RunningModel, scale: float, seed: int = 0, rank: int = 4) -> fmt.Adapter:
    g = torch.Generator().manual_seed(seed)
    factors = {m: (torch.randn(rank, d_in, generator=g) * scale, torch.randn(d_out, rank, generator=g) * scale)
               for m, (d_out, d_in) in model.shapes(["q_proj", "v_proj", "down_proj"]).items()}
    return fmt.Adapter(factors, rank=rank, alpha=float(rank))


def test_the_budget_keeps_whole_blocks_up_to_it(model: RunningModel) -> None:
    everything = model.eval_set(TEXTS, 64, 0)
    some = model.eval_set(TEXTS, 64, 1000)
    assert some.tokens <= 1000 < everything.tokens and some.tokens > 1000 - 64
    assert torch.equal(some.blocks, everything.blocks[: len(some.blocks)])  # the same blocks each time
    assert model.eval_set(TEXTS, 64, 10).blocks.shape[0] == 1  # never empty


def test_block_losses_average_to_the_packed_mean_loss(model: RunningModel) -> None:
    evals = model.eval_set(TEXTS[:20], 64)
    assert model.losses(evals).mean == pytest.approx(model.eval_loss(TEXTS[:20], 64), rel=1e-6)


def test_a_candidate_as_a_side_path_equals_the_merged_weights_and_leaves_the_master_alone(
        model: RunningModel) -> None:
    evals = model.eval_set(TEXTS, 64, 2000)
    patch = lora.build_patch([adapter(model, 0.05)], [1.0])
    before = {m: w.clone() for m, w in model.master(list(patch.modules())).items()}
    side = model.losses(evals, patch)
    assert all(torch.equal(model.master([m])[m], w) for m, w in before.items())  # bit for bit
    with model.restorable(list(patch.modules())):
        lora.apply_patch(model.master(list(patch.modules())), patch)
        merged = model.losses(evals)
    torch.testing.assert_close(side.sums, merged.sums, rtol=1e-5, atol=1e-4)
    assert side.mean != model.losses(evals).mean  # it did change the function


def test_pairing_removes_most_of_the_noise(model: RunningModel) -> None:
    evals = model.eval_set(TEXTS, 64, 4000)
    parent = model.losses(evals)
    candidate = model.losses(evals, lora.build_patch([adapter(model, 0.02)], [1.0]))
    compared = evaluation.paired(parent, candidate)
    assert compared.tokens == evals.tokens - len(evals.blocks)  # every real token but each block's first is a target
    assert 0 < compared.se < 0.25 * evaluation.unpaired_se(parent, candidate)
    same = evaluation.paired(parent, parent)
    assert same.difference == 0 and same.se == 0
    with pytest.raises(ValueError, match="same blocks"):
        evaluation.paired(parent, model.losses(model.eval_set(TEXTS, 64, 1000)))


def test_the_folder_gates_within_the_budget_and_records_the_paired_error(ledger, tmp_path) -> None:
    store = BlobStore(tmp_path / "blobs")
    settings = Settings(data_dir=tmp_path, fold_every=2, eval_tokens=1500, shard_sigmas=0.0,  # random adapters: no shard learned
                        job=JobDefaults(lora_rank=4, lora_alpha=4.0, tokens_per_task=1000))
    running = RunningModel(tiny_model_path())
    ledger.versions.publish(VersionRecord(version=0, parent=-1, files=running.publish(store)))
    folder = Folder(settings, ledger, store, running, History(ledger, store, tmp_path))
    targets = running.shapes(list(settings.job.target_modules))
    data = "".join(json.dumps({"text": t}) + "\n" for t in read_demo()[:400]).encode()
    submit(settings, ledger, store, running.tokenizer, list(targets), data, "d.jsonl", "test", {})
    calls = []
    real = shared.block_losses
    shared.block_losses = lambda m, evals, *a, **k: calls.append(evals.tokens) or real(m, evals, *a, **k)
    try:
        for seed in (1, 2):
            task_id = ledger.leases.pending(1)[0]
            fence = ledger.leases.lease(task_id, time.time() + 60, 0, max_attempts=3)
            sha = store.put(fmt.to_bytes(adapter(running, 0.002, seed)))
            assert ledger.adapters.accept(task_id, fence, sha, base_version=0, tokens=1000, rank=4, alpha=4.0).ok
        before = {m: w.clone() for m, w in running.master(list(targets)).items()}
        assert folder.maybe_fold(set()) == 1
    finally:
        shared.block_losses = real
    assert calls and all(t <= 1500 for t in calls)  # every evaluation read the budget, no more
    assert len(calls) == 4  # the parent once, two gates, the fold
    record = ledger.versions.get(1)
    assert 0 < record.metrics["paired_se"] < 0.02 and record.metrics["eval_tokens"] <= 1500
    assert record.metrics["evaluated_on"] == "coordinator"
    patch = fmt.from_bytes(store.get(record.patch))
    for m, w in before.items():  # the fold went into the master exactly once
        expected = w.clone()
        if m in patch.factors:
            lora.apply_patch({m: expected}, lora.restrict(patch, {m}))
        assert torch.equal(running.master([m])[m], expected), m


def test_a_bf16_evaluation_measures_the_same_difference(model: RunningModel) -> None:
    evals = model.eval_set(TEXTS, 64, 3000)
    patch = lora.build_patch([adapter(model, 0.1)], [1.0])
    exact = evaluation.paired(model.losses(evals), model.losses(evals, patch))
    fast = evaluation.paired(model.losses(evals, dtype="bf16"), model.losses(evals, patch, "bf16"))
    assert abs(exact.difference) > 0.01  # an effect the gate must see
    assert fast.difference == pytest.approx(exact.difference, abs=0.2 * abs(exact.difference))
    with pytest.raises(ValueError, match="not one of"):
        model.losses(evals, dtype="int4")
