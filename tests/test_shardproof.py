"""The shard proof (issue 19, item 5): an adapter is folded only if it learned from its own shard.

Adapters are trained for real on the tiny model, on the shards ``submit`` cut from a real job,
and folded through the real folder against a real Redis: an honest adapter passes; one trained on
other data, another volunteer's (a copy: byte for byte, or the same update in other bytes) and a
random update of an honest adapter's norm are refused, each with its reason and a trust outcome
for its volunteer. Delegated to a trusted worker's card, the shard samples travel with the gate's
evaluation task and the verdicts are the same (tests/test_delegated_eval.py's stand-in for Ray).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from coordinator.fold import folding
from coordinator.fold.folder import Folder
from coordinator.fold.policy import FoldPolicy
from coordinator.ledger import AdapterState, Check, VersionRecord, keys
from coordinator.model.history import History
from coordinator.model.running import RunningModel
from coordinator.model.store import BlobStore
from coordinator.schedule.submit import read_records, submit
from coordinator.settings import JobDefaults, Settings
from nomoat import adapter as fmt
from nomoat import packing
from nomoat.evaluation import Comparison, EvalSet
from nomoat.tiny import read_demo, read_fortunes, tiny_model_path
from tests.rig import published, rig  # noqa: F401
from worker.trainer import LoraSpec, TrainSpec, train_adapter

JOB = JobDefaults(lora_rank=4, lora_alpha=8.0, seq_len=64, tokens_per_task=1200)
TEXTS = read_demo()[:300]


def test_the_rule_reads_the_gap_in_paired_standard_errors() -> None:
    policy = FoldPolicy(shard_sigmas=2.0)
    held = Comparison(parent=3.0, candidate=2.95, se=0.01, tokens=2000)  # 0.05 better on held-out text
    policy.learned_from_shard(held, Comparison(3.0, 2.85, 0.01, 2000))  # 0.15 better on its shard: 7 SE
    for shard in (Comparison(3.0, 2.95, 0.01, 2000),  # no better than unseen text
                  Comparison(3.0, 2.93, 0.01, 2000),  # 0.02 more: 1.4 SE
                  Comparison(3.0, 3.10, 0.01, 2000)):  # worse
        with pytest.raises(folding.AdapterRejected, match="did not learn from its own shard") as refused:
            policy.learned_from_shard(held, shard)
        assert refused.value.check == Check.SHARD.value
    # Worse everywhere, held-out text more: a gap, but its shard did not improve in itself.
    with pytest.raises(folding.AdapterRejected):
        policy.learned_from_shard(Comparison(3.0, 3.07, 0.01, 2000), Comparison(3.0, 3.02, 0.014, 2000))
    # Nothing changed at all (a zero update): no gap, refused even with no error to compare against.
    with pytest.raises(folding.AdapterRejected):
        policy.learned_from_shard(Comparison(3.0, 3.0, 0.0, 10), Comparison(3.0, 3.0, 0.0, 10))
    # One block on a side has no error estimate (nan): the gap need only be positive.
    policy.learned_from_shard(Comparison(3.0, 3.0, math.nan, 60), Comparison(3.0, 2.99, math.nan, 60))
    assert FoldPolicy().proves_shards and not FoldPolicy(shard_sigmas=0).proves_shards  # on by default
    assert FoldPolicy.of(Settings(data_dir=Path("unused"))).proves_shards
    policy = FoldPolicy.of(Settings(data_dir=Path("unused"), shard_sigmas=3.0, shard_tokens=512))
    assert (policy.shard_sigmas, policy.shard_tokens) == (3.0, 512)


def train(texts: list[str], seed: int) -> fmt.Adapter:
    adapter, _ = train_adapter(tiny_model_path(), texts, LoraSpec(JOB.lora_rank, JOB.lora_alpha, JOB.target_modules),
                               TrainSpec(seq_len=JOB.seq_len, batch_size=2, micro_batch=2, learning_rate=4e-3,
                                         seed=seed))
    return adapter


def random_like(adapter: fmt.Adapter, seed: int) -> fmt.Adapter:
    """Random factors scaled to ``adapter``'s update norm: a free-rider the norm gate lets by."""
    g = torch.Generator().manual_seed(seed)
    factors = {m: (torch.randn(a.shape, generator=g), torch.randn(b.shape, generator=g))
               for m, (a, b) in adapter.factors.items()}
    ratio = math.sqrt(folding.delta_norm(adapter) / folding.delta_norm(fmt.Adapter(factors, adapter.rank, adapter.alpha)))
    return fmt.Adapter({m: (a * ratio, b * ratio) for m, (a, b) in factors.items()}, adapter.rank, adapter.alpha)


def same_update_other_bytes(adapter: fmt.Adapter) -> fmt.Adapter:
    """The same ΔW in other bytes: B doubled, alpha halved."""
    return fmt.Adapter({m: (a, b * 2) for m, (a, b) in adapter.factors.items()}, adapter.rank, adapter.alpha / 2)


class Job:
    """A submitted job, its tasks leased one by one, and adapters handed in under each lease."""

    def __init__(self, ledger, tmp_path, store: BlobStore | None = None, history: History | None = None,
                 **settings) -> None:
        self.ledger, self.store = ledger, store or BlobStore(tmp_path / "blobs")
        self.settings = Settings(data_dir=tmp_path, job=JOB, **{"fold_every": 8, "shard_sigmas": 2.0, **settings})
        self.running = RunningModel(tiny_model_path())
        if history is None:  # a ledger of its own: version 0 is the tiny model
            ledger.versions.publish(VersionRecord(version=0, parent=-1, files=self.running.publish(self.store)))
        self.history = history or History(ledger, self.store, tmp_path)
        data = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS).encode()
        result = submit(self.settings, ledger, self.store, self.running.tokenizer,
                        list(self.running.shapes(list(JOB.target_modules))), data, "d.jsonl", "shards", {})
        self.job_id = result.job_id
        self.tasks = ledger.tasks.of_job(self.job_id)
        self.records = self.store.get(ledger.jobs.get(self.job_id).records)

    def shard(self, index: int) -> list[str]:
        t = self.tasks[index]
        return read_records(self.records, t.start, t.end)

    def hand_in(self, index: int, adapter: fmt.Adapter, volunteer: str) -> str:
        task_id = self.tasks[index].task_id
        fence = self.ledger.leases.lease(task_id, time.time() + 60, 0, max_attempts=3)
        sha = self.store.put(fmt.to_bytes(adapter))
        accepted = self.ledger.adapters.accept(task_id, fence, sha, base_version=0, tokens=1200, rank=adapter.rank,
                                               alpha=adapter.alpha, worker_id=volunteer, volunteer=volunteer)
        assert accepted.ok, accepted.detail
        return accepted.detail


def honest_adapters(job: Job, n: int) -> list[fmt.Adapter]:
    return [train(job.shard(i), seed=i) for i in range(n)]


class CountingStore(BlobStore):
    """The local store, counting whole-blob reads (a shard sample must be read by range)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.got: list[str] = []

    def get(self, sha256: str) -> bytes:
        self.got.append(sha256)
        return super().get(sha256)


def test_the_folder_replays_the_order_the_trainer_saw_the_blocks_in() -> None:
    """The sample is drawn from the blocks a task trained on last: the folder's replay of the
    trainer's seeded order must be the order it trained in. At a vanishing lr each step's loss is
    the base model's loss on that step's one block, so the steps name their blocks."""
    texts, seed, epochs = TEXTS[:30], 5, 2
    running = RunningModel(tiny_model_path())
    blocks = packing.pack(running.tokenizer, texts, JOB.seq_len)
    base = running.losses(EvalSet(blocks))
    per_block = (base.sums / base.counts).tolist()
    steps: list[float] = []
    train_adapter(tiny_model_path(), texts, LoraSpec(JOB.lora_rank, JOB.lora_alpha, JOB.target_modules),
                  TrainSpec(seq_len=JOB.seq_len, batch_size=1, micro_batch=1, learning_rate=1e-12, epochs=epochs,
                            seed=seed), progress=lambda step, total, loss: steps.append(loss))
    assert len(steps) == epochs * len(blocks) > 10
    last_epoch = list(reversed(packing.most_recent_first(len(blocks), seed, epochs)))
    assert steps[-len(blocks):] == pytest.approx([per_block[i] for i in last_epoch], rel=1e-4)
    other = list(reversed(packing.most_recent_first(len(blocks), seed + 1, epochs)))
    assert steps[-len(blocks):] != pytest.approx([per_block[i] for i in other], rel=1e-4)


def test_only_adapters_that_learned_from_their_own_shard_are_folded(ledger, tmp_path) -> None:
    job = Job(ledger, tmp_path, store=CountingStore(tmp_path / "blobs"))
    job.store.got.clear()
    assert len(job.tasks) >= 7
    honest = honest_adapters(job, 3)
    other_data = train([f"fortune: {t}" for t in read_fortunes()[3000:3040]], seed=9)
    ids = {"honest-0": job.hand_in(0, honest[0], "alice"), "honest-1": job.hand_in(1, honest[1], "bob"),
           "honest-2": job.hand_in(2, honest[2], "carol"),
           "other-data": job.hand_in(3, other_data, "mallory-data"),
           "copy-rewritten": job.hand_in(5, same_update_other_bytes(honest[1]), "mallory-rewrite"),
           "random": job.hand_in(6, random_like(honest[2], seed=5), "mallory-random")}
    # An exact copy of alice's bytes is refused at acceptance (test_collect: at upload, counted as check copy).
    fence = ledger.leases.lease(job.tasks[4].task_id, time.time() + 60, 0, max_attempts=3)
    copy = ledger.adapters.accept(job.tasks[4].task_id, fence, job.store.put(fmt.to_bytes(honest[0])))
    assert copy.check is Check.COPY, copy
    folder = Folder(job.settings, ledger, job.store, job.running, job.history)
    assert folder.maybe_fold({job.job_id}) == 1
    got = {name: ledger.adapters.get(i) for name, i in ids.items()}
    assert {n for n, a in got.items() if a.state is AdapterState.FOLDED} == {"honest-0", "honest-1", "honest-2"}
    for name in ("other-data", "copy-rewritten", "random"):
        assert got[name].state is AdapterState.REJECTED and "did not learn from its own shard" in got[name].reason, \
            (name, got[name].reason)
    # Each refusal is an outcome on its volunteer's trust record, of the check it failed.
    outcomes = {v: ledger.adapters.trust.get(v).counts for v in ("mallory-data", "mallory-rewrite", "mallory-random")}
    assert outcomes == {"mallory-data": {"shard": 1}, "mallory-rewrite": {"shard": 1}, "mallory-random": {"shard": 1}}
    assert ledger.adapters.trust.get("alice").counts == {"accepted": 1}
    assert folder.shard_eval_tokens > 0
    # Shard samples are read by range through the records index: the whole records blob once (the
    # job's held-out slice, kept by the folder), not once more per fold for the samples.
    assert job.store.got.count(ledger.jobs.get(job.job_id).records) == 1


def test_an_adapter_alone_in_its_fold_is_judged_against_the_current_model(ledger, tmp_path) -> None:
    job = Job(ledger, tmp_path)
    folder = Folder(job.settings, ledger, job.store, job.running, job.history)
    honest = train(job.shard(0), seed=0)
    alone = job.hand_in(0, honest, "alice")
    assert folder.maybe_fold({job.job_id}) == 1 and ledger.adapters.get(alone).state is AdapterState.FOLDED
    free_rider = job.hand_in(1, random_like(honest, seed=4), "mallory")
    assert folder.maybe_fold({job.job_id}) is None
    reason = ledger.adapters.get(free_rider).reason
    assert "did not learn from its own shard" in reason and "peers" not in reason, reason


def test_an_adapters_peers_are_the_others_of_its_job_but_its_copies() -> None:
    policy = FoldPolicy()
    jobs, distances = ["a", "a", "b", "a", "a"], [0.0, 1.4, 1.3, 0.02, 0.9]
    assert policy.peers_of(0, jobs, distances) == [1, 4]  # not itself, job b, or its near-copy (3)
    assert policy.peers_of(2, jobs, [1.0] * 5) == []  # alone in its job


def test_a_replica_may_hand_in_the_bytes_of_the_task_it_repeats(ledger, tmp_path) -> None:
    job = Job(ledger, tmp_path, shard_sigmas=0)  # the copy check alone
    folder = Folder(job.settings, ledger, job.store, job.running, job.history)
    first = job.tasks[0].task_id
    assert folder.ledger.adapters.first_task_with(job.job_id, "ab" * 32, first) == first
    assert folder.ledger.adapters.first_task_with(job.job_id, "ab" * 32, first) == first  # again: still its own
    assert folder.ledger.adapters.first_task_with(job.job_id, "ab" * 32, job.tasks[1].task_id) == first
    # A replica of task 0 names it as the task it repeats (coordinator.schedule.replication).
    ledger.r.hset(keys.task(job.tasks[1].task_id), "replica_of", first)
    entry = ledger.adapters.get(job.hand_in(1, train(job.shard(0), seed=0), "bob"))
    assert folder._copied(entry) == ""  # not the hash "ab..": its own bytes, first seen
    assert ledger.adapters.first_task_with(job.job_id, entry.sha256, "another") == first


def test_delegated_to_a_worker_the_shard_samples_travel_with_the_gates(rig) -> None:
    from tests.test_delegated_eval import WORKER, InProcessCards, node_settings, on_workers

    job = Job(rig.ledger, rig.tmp, store=rig.store, history=rig.deps.history)
    honest = train(job.shard(0), seed=0)
    ids = [job.hand_in(0, honest, "alice"), job.hand_in(1, random_like(honest, seed=3), "mallory")]
    cards = InProcessCards(node_settings(rig))
    folder = Folder(job.settings, rig.ledger, rig.store, job.running, job.history,
                    evaluator=on_workers(rig, job.running, cards))
    assert folder.maybe_fold({job.job_id}) == 1
    assert [rig.ledger.adapters.get(i).state for i in ids] == [AdapterState.FOLDED, AdapterState.REJECTED]
    assert "did not learn from its own shard" in rig.ledger.adapters.get(ids[1]).reason
    # The gates' task held the job's held-out blocks and both shard samples (one per adapter):
    # each adapter's solo update on its held-out set and its sample, and its peers' mean update
    # (here the other adapter) on both; the version's own losses on the samples are not needed.
    gates = cards.tasks[1]
    assert len(gates.block_sets) == 3 and len(gates.items) == 2 + 2 + 4
    assert rig.ledger.versions.get(1).metrics["evaluated_on"] == WORKER
