"""The shard proof's two inputs (FoldPolicy.learned_from_shard, docs/trust.md): a candidate's
sample of the blocks its task trained on last, and the mean update of its peers in the fold it
is measured against. The folder scores both in the same evaluation batch as its other gates."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from coordinator.fold import folding
from coordinator.fold.policy import FoldPolicy
from coordinator.ledger import Ledger
from coordinator.model.store import BlobStore
from coordinator.schedule import replication, shards
from coordinator.schedule.submit import read_records
from nomoat import evaluation, lora, packing
from nomoat.adapter import Adapter

if TYPE_CHECKING:
    from coordinator.fold.folder import Candidate


def sample(ledger: Ledger, store: BlobStore, tokenizer: Any, policy: FoldPolicy, sampler: random.Random,
           job_id: str, task_id: str) -> evaluation.EvalSet | None:
    """About ``shard_tokens`` tokens of the task's own shard, drawn at random from the blocks
    its trainer saw last (None: the task is not in the ledger, or its shard is empty).

    The shard alone is read, through the job's records index (coordinator.schedule.shards, as
    a shard fetch reads it), and packed as its trainer packed it. The trainer visits the
    blocks in an order seeded by the task's seed (the coordinator's: ``Scheduler.spec``), so
    the folder replays it (:func:`nomoat.packing.most_recent_first`) and draws from the
    ``shard_window_tokens`` trained last: an honest adapter fits those best (a fresh LoRA at a
    constant lr generalises what it saw early and keeps what it saw last), which is what
    makes the proof tell it from one that never saw them (bench/shardproof.py)."""
    task = ledger.tasks.get(task_id)
    if task is None or task.end <= task.start:
        return None
    job = ledger.jobs.get(job_id)
    raw = b"".join(shards.shard(store, job.records, ledger.jobs.records_index(job_id),
                                task.start, task.end))
    blocks = packing.pack(tokenizer, read_records(raw), job.config.seq_len)
    sample = evaluation.recent_sample(blocks, task.index, job.config.epochs, policy.shard_tokens,
                                      policy.shard_window_tokens, sampler)
    return sample if float(sample.targets().sum()) > 0 else None


def peer_references(policy: FoldPolicy, admitted: Sequence[Candidate]) -> dict[str, Adapter]:
    """Adapter id -> the mean update of its peers (FoldPolicy.peers_of: the batch's other
    adapters of its job, each at its staleness factor), for each candidate with a shard sample
    and at least one peer. Its peers learned the same job from other shards, so what they
    learned alike (the job's kind of text) cancels block by block against it, and what is
    left is what it learned from its own shard."""
    proving = [k for k, c in enumerate(admitted) if c.shard_set]
    if not proving or len(admitted) < 2:
        return {}
    jobs = [c.job_id for c in admitted]
    references = {}
    for k in proving:
        others = [j for j, job in enumerate(jobs) if j != k and job == jobs[k]]
        near = {j: replication.distance(admitted[k].adapter, admitted[j].adapter) for j in others}
        peers = policy.peers_of(k, jobs, [near.get(j, math.inf) for j in range(len(admitted))])
        if peers:
            references[admitted[k].adapter_id] = lora.build_patch(
                [admitted[j].adapter for j in peers],
                [folding.staleness_factor(admitted[j].tau) / len(peers) for j in peers])
    return references
