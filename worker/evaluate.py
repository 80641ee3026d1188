"""An evaluation task: the coordinator's gates scored on this node's card; :func:`run_evaluation`
is what the coordinator submits to Ray when it delegates an evaluation (``--eval-on``).

    EvalTask -> bring the cached model to (lineage, version) -> score every item -> EvalReply

A coordinator without a GPU would spend minutes of CPU per fold on its gates at 1B parameters
while volunteers' cards sit idle; so it sends each batch of a fold (its parents and every
adapter's solo update, or its fold check) here as one task. What arrives is plain data
(:class:`nomoat.evaluation.EvalTask`: the version, the blocks as token ids, the patches as
adapter safetensors bytes); what goes back is per-block loss sums and target counts. The blocks
are each job's held-out blocks and, for the shard proof, a sample of each adapter's own shard
(``coordinator.fold.folder``): a trusted card sees training text, never more than the gates read.

The model comes from the node's cache, brought to the version over gRPC as a training task's is
(:meth:`worker.cache.ModelCache.ensure`), which checks the folder against its (lineage, version)
stamp: a worker never scores another lineage's weights under this version's name. It is loaded
in fp32 on this node's device (CUDA when there is one, else the CPU) and scored with the
coordinator's own code (:func:`nomoat.evaluation.answer`), so the numbers are the ones the
coordinator would have measured; then it is freed: between evaluations the card is for training.
Like the training entry point, it never imports Ray and talks to the coordinator only over gRPC.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time

from nomoat.client import CoordinatorClient
from nomoat.evaluation import EvalReply, EvalTask, answer
from nomoat.logs import quiet_libraries
from worker.cache import ModelCache
from worker.settings import NodeSettings

log = logging.getLogger("nomoat.evaluate")


def eval_device() -> str:
    """Where this node scores: its CUDA card when torch sees one, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_evaluation(task: EvalTask, node: NodeSettings | None = None) -> EvalReply:
    """Score every item of ``task`` on (its lineage, its version); ``node``: this node's own
    settings (default: read from its environment, where the agent put them)."""
    import torch
    from transformers import AutoModelForCausalLM

    quiet_libraries()  # a Ray worker process: our CLI's edge did not run here
    node = node or NodeSettings.from_env()
    if node.torch_threads > 0:
        torch.set_num_threads(node.torch_threads)
    started = time.monotonic()
    with CoordinatorClient(task.coordinator, node.token or task.token, node.tls_ca or None,
                            node.ca_fingerprint or None) as client:
        folder = ModelCache(node.cache_dir).ensure(client, task.lineage, task.version)
    device = eval_device()
    placement = {} if device == "cpu" else {"device_map": {"": device}}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **placement)
    model.requires_grad_(False)
    try:
        reply = answer(model, task, device)
    finally:
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    seconds = time.monotonic() - started
    log.info("scored %d evaluations of version %d on %s in %.1f s", len(task.items), task.version, device, seconds)
    return dataclasses.replace(reply, seconds=seconds)
