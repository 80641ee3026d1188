"""Versions, patches and snapshots on the real tiny model: exact rebuilds, the PEFT round trip,
rollback, unmerge, staleness and the gates of the folder."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from coordinator.fold import folding
from coordinator.fold.folder import Folder
from coordinator.model.history import History, peft_files, plan_catch_up
from coordinator.ledger import Ledger, VersionRecord
from coordinator.model.running import RunningModel, materialize
from coordinator.settings import JobDefaults, Settings
from coordinator.model.store import BlobStore
from coordinator.schedule.submit import submit
from nomoat import adapter as fmt
from nomoat.tiny import read_demo, tiny_model_path
from worker.cache import apply_patches

RANK = 4


@pytest.mark.parametrize(
    ("have", "want", "patches", "snapshots", "expected"),
    [
        (3, 4, {1: 10, 2: 10, 3: 10, 4: 10}, {0: 1000}, (None, [4], 10)),
        (0, 5, {v: 300 for v in range(1, 6)}, {0: 1000, 4: 1000}, (4, [5], 1300)),
        (None, 2, {1: 5, 2: 5}, {0: 100}, (0, [1, 2], 110)),
        (2, 2, {1: 5, 2: 5}, {0: 100}, (None, [], 0)),
    ],
)
def test_catch_up_takes_the_cheaper_path(have, want, patches, snapshots, expected):
    plan = plan_catch_up(have, want, patches, snapshots)
    assert (plan.snapshot, plan.patches, plan.bytes) == expected


def test_catch_up_never_costs_more_than_the_full_weights():
    patches = {v: 400 for v in range(1, 26)}
    plan = plan_catch_up(5, 25, patches, {0: 1000, 10: 1000, 20: 1000}, full_bytes=1000)
    assert (plan.snapshot, plan.patches, plan.bytes) == (25, [], 1000)
    assert plan_catch_up(24, 25, patches, {0: 1000}, full_bytes=1000).patches == [25]


class Rig:
    def __init__(self, ledger: Ledger, tmp_path: Path, **settings) -> None:
        self.ledger = ledger
        self.store = BlobStore(tmp_path / "blobs")
        self.settings = Settings(data_dir=tmp_path, fold_every=2, eval_epsilon=0.02, shard_sigmas=0.0,  # random adapters: no shard learned
                                 job=JobDefaults(lora_rank=RANK, lora_alpha=8.0, tokens_per_task=1000), **settings)
        model = RunningModel(tiny_model_path())
        ledger.versions.publish(VersionRecord(version=0, parent=-1, files=model.publish(self.store)))
        self.history = History(ledger, self.store, tmp_path)
        self.folder = Folder(self.settings, ledger, self.store, model, self.history)
        self.targets = model.shapes(list(self.settings.job.target_modules))
        data = "".join(json.dumps({"text": t}) + "\n" for t in read_demo()[:400]).encode()
        self.job = submit(self.settings, ledger, self.store, model.tokenizer, list(self.targets),
                          data, "d.jsonl", "test", {}).job_id
        self.seed = 0

    def adapter(self, scale: float = 0.02) -> fmt.Adapter:
        self.seed += 1
        g = torch.Generator().manual_seed(self.seed)
        factors = {m: (torch.randn(RANK, d_in, generator=g) * scale, torch.randn(d_out, RANK, generator=g) * scale)
                   for m, (d_out, d_in) in self.targets.items()}
        return fmt.Adapter(factors, rank=RANK, alpha=8.0)

    def offer(self, adapter: fmt.Adapter, base_version: int | None = None) -> str:
        """Lease the next task and upload ``adapter`` for it, as a worker would."""
        task_id = self.ledger.leases.pending(1)[0]
        base = self.ledger.versions.latest() if base_version is None else base_version
        fence = self.ledger.leases.lease(task_id, time.time() + 60, base, max_attempts=3)
        data = fmt.to_bytes(adapter)
        sha = self.store.put(data)
        accepted = self.ledger.adapters.accept(task_id, fence, sha, base_version=base, tokens=1000, rank=RANK,
                                               alpha=8.0)
        assert accepted.ok
        return accepted.detail

    def master(self) -> dict[str, torch.Tensor]:
        return {m: w.clone() for m, w in self.folder.model.master(list(self.targets)).items()}


@pytest.fixture
def rig(ledger, tmp_path) -> Rig:
    return Rig(ledger, tmp_path, snapshot_every=3)


def test_patch_chain_rebuilds_every_version_exactly(rig: Rig):
    weights = {0: rig.master()}
    for _ in range(4):
        rig.offer(rig.adapter())
        rig.offer(rig.adapter())
        number = rig.folder.maybe_fold(set())
        assert number is not None
        weights[number] = rig.master()
    assert rig.ledger.versions.get(3).files and not rig.ledger.versions.get(4).files
    for version, expected in weights.items():
        rebuilt = rig.history.rebuild(version).master(list(rig.targets))
        assert all(torch.equal(rebuilt[m], expected[m]) for m in expected), f"version {version} differs"


def test_peft_folder_since_a_version_reproduces_the_newest(rig: Rig, tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for _ in range(3):
        rig.offer(rig.adapter())
        rig.offer(rig.adapter())
        rig.folder.maybe_fold(set())
    newest = rig.master()
    out = tmp_path / "update"
    out.mkdir()
    for name, data in rig.history.peft(1, 3).items():
        (out / name).write_bytes(data)
    base = materialize(rig.store, rig.history.hf_files(1), tmp_path / "v1")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).merge_and_unload()
    modules = dict(merged.named_modules())
    for m, w in newest.items():
        torch.testing.assert_close(modules[m].weight.data, w, rtol=0, atol=1e-6)


def test_a_peft_update_pulled_again_and_again_is_built_once_per_version(rig: Rig, monkeypatch):
    """A reader pulling ``--since 0 --format peft`` in a loop (bench/adversary.py's watch flood)
    costs one build per new version: the same update again reads no patch."""
    for _ in range(2):
        rig.offer(rig.adapter())
        rig.offer(rig.adapter())
        rig.folder.maybe_fold(set())
    read = []
    patch = rig.history.patch
    monkeypatch.setattr(rig.history, "patch", lambda v: read.append(v) or patch(v))
    first = rig.history.peft(0, 2)
    assert sorted(read) == [1, 2]
    assert rig.history.peft(0, 2) == first and sorted(read) == [1, 2]  # the same update: no patch read
    rig.history.peft(1, 2)  # another update is built
    assert sorted(read) == [1, 2, 2]


def test_peft_config_declares_per_module_ranks():
    patch = fmt.Adapter({"a.q": (torch.ones(6, 4), torch.ones(3, 6)), "a.k": (torch.ones(2, 4), torch.ones(3, 2))},
                        rank=6, alpha=6.0, kind=fmt.KIND_PATCH)
    config = json.loads(peft_files(patch)["adapter_config.json"])
    assert config["r"] == 6 and config["rank_pattern"] == {"a.k": 2} and config["alpha_pattern"] == {"a.k": 2}


def test_rollback_restores_the_old_weights_exactly_as_a_new_version(rig: Rig):
    rig.offer(rig.adapter())
    rig.offer(rig.adapter())
    rig.folder.maybe_fold(set())
    at_one = rig.master()
    rig.offer(rig.adapter())
    rig.offer(rig.adapter())
    assert rig.folder.maybe_fold(set()) == 2
    number, _ = rig.folder.rollback(1)
    assert number == 3 and rig.ledger.versions.get(3).parent == 2
    assert rig.ledger.versions.get(3).operation == "rollback"
    now = rig.master()
    assert all(torch.equal(now[m], at_one[m]) for m in at_one)
    assert all(torch.equal(rig.history.rebuild(3).master(list(at_one))[m], at_one[m]) for m in at_one)
    with pytest.raises(ValueError, match="cannot roll back to version 7"):
        rig.folder.rollback(7)


def test_unmerge_removes_exactly_one_contribution(rig: Rig):
    before = rig.master()
    first = rig.offer(rig.adapter())
    second = rig.offer(rig.adapter())
    assert rig.folder.maybe_fold(set()) == 1
    number, _ = rig.folder.unmerge(first)
    assert number == 2 and rig.ledger.adapters.get(first).state == "unmerged"
    kept = fmt.from_bytes(rig.store.get(rig.ledger.adapters.get(second).sha256))
    only_second = folding.build_patch([kept], [rig.ledger.adapters.get(second).weight])
    after = rig.master()
    for m, w in before.items():
        torch.testing.assert_close(after[m], w + folding.patch_delta(only_second, m), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="only a folded adapter"):
        rig.folder.unmerge(first)


def test_harmful_adapter_is_rejected_and_nothing_is_published(rig: Rig):
    good = rig.offer(rig.adapter())
    harmful = rig.offer(rig.adapter(scale=0.02 * 1000**0.5))  # ΔW = B·A: 1000 times a normal update
    assert rig.folder.maybe_fold(set()) == 1
    assert "worse" in rig.ledger.adapters.get(harmful).reason or "norm" in rig.ledger.adapters.get(harmful).reason
    assert rig.ledger.adapters.get(good).state == "folded"
    before = rig.master()
    rig.offer(rig.adapter(scale=0.02 * 1000**0.5))
    rig.offer(rig.adapter(scale=0.02 * 1000**0.5))
    assert rig.folder.maybe_fold(set()) is None
    assert rig.ledger.versions.latest() == 1
    assert all(torch.equal(before[m], w) for m, w in rig.master().items())


def test_stale_adapter_is_refused_with_its_reason(ledger, tmp_path):
    rig = Rig(ledger, tmp_path, max_staleness=1)
    for _ in range(2):
        rig.offer(rig.adapter())
        rig.offer(rig.adapter())
        rig.folder.maybe_fold(set())
    stale = rig.offer(rig.adapter(), base_version=0)  # τ = 2 > 1
    fresh = rig.offer(rig.adapter())
    assert rig.folder.maybe_fold(set()) == 3
    assert rig.ledger.adapters.get(stale).state == "rejected"
    assert "stale" in rig.ledger.adapters.get(stale).reason or "τ" in rig.ledger.adapters.get(stale).reason
    assert rig.ledger.adapters.get(fresh).state == "folded"


def test_worker_catches_up_by_applying_patches(rig: Rig, tmp_path: Path):
    for _ in range(2):
        rig.offer(rig.adapter())
        rig.offer(rig.adapter())
        rig.folder.maybe_fold(set())
    folder = materialize(rig.store, rig.history.hf_files(0), tmp_path / "cache" / "0")
    patches = []
    for v in (1, 2):
        path = tmp_path / f"{v}.safetensors"
        path.write_bytes(rig.store.get(rig.ledger.versions.get(v).patch))
        patches.append(path)
    apply_patches(folder, patches)
    caught_up = RunningModel(folder).master(list(rig.targets))
    for m, w in rig.master().items():
        torch.testing.assert_close(caught_up[m], w, rtol=0, atol=1e-6)


def test_outer_momentum_is_nesterov_on_the_folded_deltas(ledger, tmp_path):
    rig = Rig(ledger, tmp_path, outer_momentum=0.5, outer_lr=0.8, snapshot_every=100)
    weights = [rig.master()]
    for _ in range(3):
        rig.offer(rig.adapter())
        rig.offer(rig.adapter())
        assert rig.folder.maybe_fold(set()) is not None
        weights.append(rig.master())
    deltas = [fmt.from_bytes(rig.store.get(rig.ledger.versions.get(v).delta)) for v in (1, 2, 3)]
    mu, lr = 0.5, 0.8
    for m in weights[0]:
        d = [folding.patch_delta(x, m) for x in deltas]
        expected_step3 = lr * ((1 + mu) * d[2] + mu**2 * d[1] + mu**3 * d[0])
        torch.testing.assert_close(weights[3][m] - weights[2][m], expected_step3, rtol=1e-4, atol=1e-6)
    # the applied steps are still exact low-rank patches: rebuilding replays them bit for bit
    rebuilt = rig.history.rebuild(3).master(list(weights[0]))
    assert all(torch.equal(rebuilt[m], weights[3][m]) for m in weights[0])


def test_outer_lr_without_momentum_scales_each_fold(ledger, tmp_path):
    rig = Rig(ledger, tmp_path, outer_lr=1.5, snapshot_every=100)
    before = rig.master()
    rig.offer(rig.adapter())
    rig.offer(rig.adapter())
    assert rig.folder.maybe_fold(set()) == 1
    after = rig.master()
    record = rig.ledger.versions.get(1)
    delta = fmt.from_bytes(rig.store.get(record.delta))  # the plain fold, kept beside the applied patch
    for m in before:
        torch.testing.assert_close(after[m] - before[m], 1.5 * folding.patch_delta(delta, m), rtol=1e-4, atol=1e-6)


def test_an_adapter_folded_alone_takes_its_share_of_the_step_its_task_was_sized_for(rig: Rig):
    # Its task trained at the job's batch / 3 (the scheduler recorded K = 3); the job waits on
    # the buffer, so it folds alone: at 1/3, as among its two peers (FoldPolicy.weights).
    task_id = rig.ledger.leases.pending(1)[0]
    rig.ledger.tasks.set_training([(task_id, 2, 1e-3, 3)])
    adapter_id = rig.offer(rig.adapter())
    assert rig.folder.maybe_fold({rig.job}) == 1
    assert rig.ledger.adapters.get(adapter_id).weight == pytest.approx(1 / 3)


# -- a fold or an operation that fails halfway -------------------------------------------------


def misshapen(rig: Rig) -> fmt.Adapter:
    """An adapter that passes every check before the evaluation (format, norm) but whose factors
    do not fit the model's matrices: folding it fails with an error nobody planned for."""
    adapter = rig.adapter()
    factors = {m: (torch.cat([a, a[:, :1]], dim=1), b) for m, (a, b) in adapter.factors.items()}
    return fmt.Adapter(factors, rank=adapter.rank, alpha=adapter.alpha)


def test_a_fold_that_keeps_failing_on_one_adapter_parks_it_and_folds_the_rest(ledger, tmp_path, monkeypatch):
    rig = Rig(ledger, tmp_path, tick_s=0.02)
    rebuilds = []
    real_rebuild = rig.history.rebuild
    monkeypatch.setattr(rig.history, "rebuild", lambda *a, **k: rebuilds.append(a) or real_rebuild(*a, **k))
    bad = rig.offer(misshapen(rig))
    good = [rig.offer(rig.adapter()), rig.offer(rig.adapter())]
    errors, published, end = 0, None, time.monotonic() + 120
    while published is None and time.monotonic() < end:
        try:
            published = rig.folder.maybe_fold(set())
        except RuntimeError:
            errors += 1
        time.sleep(0.01)
    assert published == 1, "the fold kept failing on the same adapter"
    record = rig.ledger.adapters.get(bad)
    assert record.state == "rejected" and "failed 3 times in a row" in record.reason
    # The first good one was in the failed fold, so it was tried alone too (and folded); the
    # other waits for the next fold, as any adapter does.
    assert [rig.ledger.adapters.get(a).state for a in good] == ["folded", "buffered"]
    assert errors == 3  # the whole fold once, then the suspect alone until it was parked
    assert rebuilds == []  # nothing unpublished went into the weights, so nothing was rebuilt
    assert any(r.kind == "parked" for r in rig.ledger.counters.recent_refusals())


@pytest.mark.parametrize("operation", ["rollback", "unmerge"])
def test_an_operation_that_fails_halfway_leaves_the_model_at_the_ledgers_version(rig: Rig, monkeypatch,
                                                                                 operation: str):
    first = rig.offer(rig.adapter())
    rig.offer(rig.adapter())
    assert rig.folder.maybe_fold(set()) == 1
    rig.offer(rig.adapter())
    rig.offer(rig.adapter())
    assert rig.folder.maybe_fold(set()) == 2
    at_two = rig.master()

    def crash(job_ids):
        raise RuntimeError("the evaluation crashed")

    monkeypatch.setattr(rig.folder, "_eval", crash)  # after the weights changed, before the publish
    with pytest.raises(RuntimeError):
        rig.folder.rollback(0) if operation == "rollback" else rig.folder.unmerge(first)
    assert rig.ledger.versions.latest() == 2
    now = rig.master()
    assert all(torch.equal(now[m], w) for m, w in at_two.items()), "the weights are not the ledger's version 2"
    assert rig.folder.version == 2


def test_fold_failures_try_suspects_alone_back_off_and_name_the_one_to_park():
    from coordinator.fold.failures import FoldFailures
    from coordinator.ledger import AdapterRecord

    a, b, c = (AdapterRecord(adapter_id=x, task=f"t-{x}", fence=1, sha256="", job="j") for x in "abc")
    failures = FoldFailures(tick_s=1.0, park_after=3)
    assert failures.batch([a, b, c], take=2) == [a, b]
    assert failures.failed([a, b], now=0.0) is None
    assert failures.waiting(1.5) and not failures.waiting(2.5)  # 1 s doubled
    assert failures.batch([a, b, c], take=2) == [a]  # the first suspect alone
    failures.succeeded([a])  # a folds alone: cleared
    assert failures.batch([b, c], take=2) == [b]
    assert failures.failed([b], now=10.0) is None and failures.waiting(11.0)
    assert failures.failed([b], now=20.0) == b  # its third failure: parked, and no wait for the rest
    assert not failures.waiting(20.0) and failures.batch([c], take=2) == [c]


def test_every_version_carries_its_model_card(rig: Rig):
    """README.md and nomoat.json: base model, lineage, version and parent, jobs and datasets by
    name and sha256, the held-out loss history, and the contributors with their weight."""
    from coordinator.model import modelcard, pull

    for worker in ("w-a", "w-b", "w-a", "w-a"):
        task_id = rig.ledger.leases.pending(1)[0]
        base = rig.ledger.versions.latest()
        fence = rig.ledger.leases.lease(task_id, time.time() + 60, base, max_attempts=3)
        sha = rig.store.put(fmt.to_bytes(rig.adapter()))
        assert rig.ledger.adapters.accept(task_id, fence, sha, base_version=base, tokens=1000, rank=RANK,
                                          alpha=8.0, worker_id=worker).ok
        if worker == "w-b" or rig.ledger.versions.latest() == 1 and len(rig.ledger.adapters.buffered()) == 2:
            assert rig.folder.maybe_fold(set()) is not None
    assert rig.ledger.versions.latest() == 2
    job = rig.ledger.jobs.get(rig.job)
    planned = pull.plan(rig.ledger, rig.history, rig.store, pull.Format.HF, 0, 2)
    files = {f.path: f.sha256 for f in planned.files}
    card = json.loads(rig.store.get(files[modelcard.MANIFEST]))
    readme = rig.store.get(files[modelcard.README]).decode()
    v1, v2 = rig.ledger.versions.get(1), rig.ledger.versions.get(2)
    assert (card["version"], card["parent"], card["lineage"]) == (2, 1, rig.history.lineage().id)
    assert card["base_model"] == rig.settings.base_model and f"base_model: {rig.settings.base_model}" in readme
    assert card["jobs"] == [{"job_id": rig.job, "name": "test", "dataset_sha256": job.dataset,
                             "records_sha256": job.records}]
    assert job.dataset in readme and "| test |" in readme
    assert card["contributors"] == [{"worker": "w-a", "worker_id": "w-a", "adapters": 2,
                                     "weight": pytest.approx(sum(a.weight for a in v2.adapters))}]
    first = json.loads(rig.store.get(modelcard.files_of(v1)[modelcard.MANIFEST]))["contributors"]
    assert sorted(c["worker_id"] for c in first) == ["w-a", "w-b"]
    assert card["loss_history"] == [[0, None], [1, pytest.approx(v1.eval_loss)], [2, pytest.approx(v2.eval_loss)]]
    assert f"| 2 | {v2.eval_loss:.4f} |" in readme and "| w-a | 2 |" in readme
    # Version 0 (published before the folder ran) gets its card at pull time.
    v0 = {f.path for f in pull.plan(rig.ledger, rig.history, rig.store, pull.Format.HF, 0, 0).files}
    assert {modelcard.README, modelcard.MANIFEST} <= v0
