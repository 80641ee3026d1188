"""Evaluations delegated to a trusted worker (issue 11): the worker's entry point scores what the
coordinator would, on the version it was asked for; a fold costs two evaluation tasks; a task
that fails or takes too long is scored on the coordinator instead, and the fold goes on.

The worker's entry point (``worker.evaluate.run_evaluation``) runs in this process against the
coordinator's real gRPC server (tests/rig.py) and the real tiny model. Ray, the transport between
the two, is what the fast tier cannot start: :class:`InProcessCards` stands in for
``coordinator.schedule.ray_dispatch.RayDispatcher``'s evaluation calls (the real one is tests/test_eval_cluster.py's).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import pytest
import torch

from coordinator.fold import evaluators

from nomoat import evaluation
from coordinator.fold.folder import Folder
from coordinator.model.running import RunningModel
from coordinator.schedule.transport import Node
from coordinator.settings import JobDefaults, Settings
from coordinator.schedule.submit import submit
from nomoat import adapter as fmt
from nomoat import lora
from nomoat.client import NomoatError
from nomoat.evaluation import EvalReply, EvalTask
from nomoat.lineage import new_lineage
from nomoat.tiny import read_demo, tiny_model_path
from tests.rig import Rig, published, rig  # noqa: F401
from worker.evaluate import run_evaluation
from worker.settings import NodeSettings

TEXTS = read_demo()[:400]
WORKER = "w-eval"


def adapter(model: RunningModel, scale: float, seed: int = 0, rank: int = 4) -> fmt.Adapter:
    g = torch.Generator().manual_seed(seed)
    factors = {m: (torch.randn(rank, d_in, generator=g) * scale, torch.randn(d_out, rank, generator=g) * scale)
               for m, (d_out, d_in) in model.shapes(["q_proj", "v_proj"]).items()}
    return fmt.Adapter(factors, rank=rank, alpha=float(rank))


def node_settings(rig: Rig) -> NodeSettings:
    """A trusted worker's node: its own cache, the trusted-worker token."""
    return NodeSettings(cache_dir=rig.tmp / "worker-cache", token=rig.tokens["trusted-worker"])


class InProcessCards:
    """One trusted worker's card, reached in this process instead of over Ray (a stand-in for the
    transport only: the task itself is the real entry point, over real gRPC). ``lineage``
    replaces the lineage a task names (a worker asked for a model it must refuse); ``delay_s``
    holds each task back that long (a card busy past the timeout)."""

    def __init__(self, node: NodeSettings, lineage: str = "", delay_s: float = 0.0, up: bool = True) -> None:
        self.node, self.lineage, self.delay_s, self.up = node, lineage, delay_s, up
        self.tasks: list[EvalTask] = []
        self._pool = ThreadPoolExecutor(1)

    def eval_card(self, need_gb: float) -> Node | None:
        return Node("node-1", 24.0, False, worker_id=WORKER) if self.up else None

    def evaluate(self, task: EvalTask, node: Node, need_gb: float, timeout_s: float) -> EvalReply:
        if self.lineage:
            task = EvalTask(self.lineage, *[getattr(task, f) for f in ("version", "coordinator", "token", "dtype",
                                                                        "block_sets", "items")])
        self.tasks.append(task)

        cancelled = threading.Event()

        def run() -> EvalReply:
            if cancelled.wait(self.delay_s):  # cancelled while it waited for the card, as Ray cancels it
                raise RuntimeError("cancelled")
            return run_evaluation(task, self.node)

        try:
            return self._pool.submit(run).result(timeout=timeout_s)
        except FutureTimeout:
            cancelled.set()
            raise TimeoutError(f"no answer within {timeout_s:g} s") from None


def on_workers(rig: Rig, model: RunningModel, cards: InProcessCards, timeout_s: float = 120.0) -> evaluators.OnWorkers:
    return evaluators.OnWorkers(cards, evaluators.OnCoordinator(model), lineage=rig.deps.history.lineage().id,
                                coordinator=rig.address, token=rig.tokens["worker"], dtype="fp32",
                                timeout_s=timeout_s, need_gb=1.0)


def test_the_worker_scores_the_version_and_each_patch_as_the_coordinator_does(rig, published) -> None:
    model = published.model
    evals = [model.eval_set(TEXTS[:60], 64, 1500), model.eval_set(TEXTS[60:120], 32, 700)]
    patch = lora.build_patch([adapter(model, 0.05)], [1.0])
    task = EvalTask.of(rig.deps.history.lineage().id, 0, rig.address, rig.tokens["worker"], "fp32", evals,
                       [(0, None), (0, patch), (1, patch)])
    reply = run_evaluation(task, node_settings(rig))
    got = reply.losses(evals, task.items)
    expected = [model.losses(evals[0]), model.losses(evals[0], patch), model.losses(evals[1], patch)]
    for mine, theirs in zip(got, expected):
        assert torch.equal(mine.counts, theirs.counts)
        torch.testing.assert_close(mine.sums, theirs.sums, rtol=1e-5, atol=1e-4)
    assert abs(got[1].mean - got[0].mean) > 1e-3  # the patch was applied: a difference the check would see
    assert reply.device == "cpu" and reply.seconds > 0
    # The worker brought its own cache to (lineage, version 0), over gRPC.
    assert (rig.tmp / "worker-cache" / "models" / rig.deps.history.lineage().id / "0").is_dir()


def test_the_worker_refuses_a_version_of_another_lineage(rig, published) -> None:
    evals = [published.model.eval_set(TEXTS[:20], 64, 500)]
    other = new_lineage({"model.safetensors": "0" * 64}).id
    task = EvalTask.of(other, 0, rig.address, rig.tokens["worker"], "fp32", evals, [(0, None)])
    with pytest.raises(NomoatError, match="lineage"):
        run_evaluation(task, node_settings(rig))


def test_a_reply_on_other_blocks_or_not_finite_is_refused(published) -> None:
    evals = [published.model.eval_set(TEXTS[:20], 64, 500)]
    task = EvalTask.of("x", 0, "", "", "fp32", evals, [(0, None)])
    good = published.model.losses(evals[0])
    sums, counts = tuple(good.sums.tolist()), tuple(good.counts.tolist())
    assert EvalReply((sums,), (counts,)).losses(evals, task.items)[0].mean == pytest.approx(good.mean)
    with pytest.raises(ValueError, match="not on the blocks"):
        EvalReply((sums,), ((counts[0] + 1, *counts[1:]),)).losses(evals, task.items)
    with pytest.raises(ValueError, match="finite"):
        EvalReply(((float("nan"), *sums[1:]),), (counts,)).losses(evals, task.items)
    with pytest.raises(ValueError, match="answered 2 evaluations for 1"):
        EvalReply((sums, sums), (counts, counts)).losses(evals, task.items)


def test_a_failed_or_late_or_impossible_delegation_is_scored_on_the_coordinator(rig, published, caplog) -> None:
    model = published.model
    sets = {"job": model.eval_set(TEXTS[:60], 64, 1000)}
    patch = lora.build_patch([adapter(model, 0.05)], [1.0])
    batch = evaluators.Batch(0, sets, ("job",), (("job", patch),))
    local = evaluators.OnCoordinator(model).evaluate(batch)
    assert local.where == evaluators.COORDINATOR
    other = new_lineage({"model.safetensors": "0" * 64}).id
    cases = {"fails": InProcessCards(node_settings(rig), lineage=other),
             "late": InProcessCards(node_settings(rig), delay_s=3.0),
             "no card": InProcessCards(node_settings(rig), up=False)}
    for name, cards in cases.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="nomoat.evaluation"):
            got = on_workers(rig, model, cards, timeout_s=1.0).evaluate(batch)
        assert got.where == evaluators.COORDINATOR, name
        assert torch.equal(got.parents["job"].sums, local.parents["job"].sums), name
        assert torch.equal(got.candidates[0].sums, local.candidates[0].sums), name
        (line,) = [r.getMessage() for r in caplog.records]
        assert "evaluating it on the coordinator" in line and "version 0" in line, (name, line)
        reason = {"fails": "lineage", "late": "TimeoutError: no answer within 1 s", "no card": "no trusted worker"}
        assert reason[name] in line, (name, line)


def test_parents_are_reused_only_where_they_were_measured(rig, published) -> None:
    model = published.model
    sets = {"job": model.eval_set(TEXTS[:60], 64, 1000)}
    cards = InProcessCards(node_settings(rig))
    known = evaluators.OnCoordinator(model).evaluate(evaluators.Batch(0, sets, ("job",)))
    fake = evaluation.Losses(known.parents["job"].sums + 1.0, known.parents["job"].counts)
    # Measured on the coordinator: the worker scores its own parent, it does not pair with ours.
    got = on_workers(rig, model, cards).evaluate(evaluators.Batch(0, sets, ("job",), (), {"job": fake}, "coordinator"))
    assert got.where == WORKER and len(cards.tasks[-1].items) == 1
    torch.testing.assert_close(got.parents["job"].sums, known.parents["job"].sums, rtol=1e-5, atol=1e-4)
    # Measured on that worker: reused, and nothing is sent for it.
    patch = lora.build_patch([adapter(model, 0.05)], [1.0])
    again = on_workers(rig, model, cards).evaluate(
        evaluators.Batch(0, sets, ("job",), (("job", patch),), {"job": fake}, WORKER))
    assert again.parents["job"] is fake and len(cards.tasks[-1].items) == 1 and cards.tasks[-1].items[0].patch


def test_a_fold_evaluated_on_a_worker_costs_two_tasks_and_says_where(rig, caplog) -> None:
    settings = Settings(data_dir=rig.tmp, fold_every=2, eval_tokens=1500, shard_sigmas=0.0,  # random adapters: no shard learned
                        job=JobDefaults(lora_rank=4, lora_alpha=4.0, tokens_per_task=1000))
    running = RunningModel(tiny_model_path())  # its own: the fold changes it
    cards = InProcessCards(node_settings(rig))
    folder = Folder(settings, rig.ledger, rig.store, running, rig.deps.history,
                    evaluator=on_workers(rig, running, cards))
    targets = running.shapes(list(settings.job.target_modules))
    data = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS).encode()
    submit(settings, rig.ledger, rig.store, running.tokenizer, list(targets), data, "d.jsonl", "test", {})
    for seed in (1, 2):
        task_id = rig.ledger.leases.pending(1)[0]
        fence = rig.ledger.leases.lease(task_id, time.time() + 60, 0, max_attempts=3)
        sha = rig.store.put(fmt.to_bytes(adapter(running, 0.002, seed)))
        assert rig.ledger.adapters.accept(task_id, fence, sha, base_version=0, tokens=1000, rank=4, alpha=4.0).ok
    with caplog.at_level(logging.INFO, logger="nomoat.fold"):
        assert folder.maybe_fold(set()) == 1
    # The job's base loss (once per job), then the fold: its parent and both solo gates in one
    # task (the parent known from the first, measured on the same worker, is not sent again),
    # its fold check in another.
    assert [len(t.items) for t in cards.tasks] == [1, 2, 1]
    assert all(t.version == 0 for t in cards.tasks)
    record = rig.ledger.versions.get(1)
    assert record.metrics["evaluated_on"] == WORKER
    assert "evaluated on worker w-eval" in caplog.text
    # The next version's parents are the fold check's candidate losses, on the same worker.
    assert folder._parent_losses[:2] == (1, WORKER)
