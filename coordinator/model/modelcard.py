"""The model card of a version: who and what made it, as README.md and nomoat.json.

Every published version carries both (a Hugging Face folder is complete with its card): the base
model, the lineage, the version and its parent, the jobs and datasets folded into it (by name and
sha256), the held-out loss history, and the contributors with their weight in this version.
Credit travels with the model.

Written once, when the folder makes the version (:func:`make`), into the blob store; the
version's record names the two blobs (``metrics["card"]``) and every folder pull adds them
(:func:`files_of`). The loss history is the parent card's plus this version's line, so making a
card reads O(1) records, never the whole history. Pure data in, bytes out, apart from the reads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

README = "README.md"
MANIFEST = "nomoat.json"
CARD_KEY = "card"  # VersionRecord.metrics[CARD_KEY]: {README: sha256, MANIFEST: sha256}
HISTORY_KEPT = 1000  # loss-history lines a card carries (the newest)


@dataclass(frozen=True)
class Contributor:
    worker: str  # the worker's name (its id when it has none)
    worker_id: str
    adapters: int
    weight: float  # the sum of its adapters' fold weights in this version


@dataclass(frozen=True)
class Card:
    base_model: str
    lineage: str
    version: int
    parent: int
    eval_loss: float
    operation: str = ""  # "rollback" / "unmerge", "" for a fold
    jobs: list[dict[str, Any]] = field(default_factory=list)  # job_id, name, dataset_sha256, records_sha256
    contributors: list[Contributor] = field(default_factory=list)
    loss_history: list[list[float]] = field(default_factory=list)  # [version, held-out loss], oldest first

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "nomoat-model-card/1", "base_model": self.base_model, "lineage": self.lineage,
            "version": self.version, "parent": self.parent, "eval_loss": _num(self.eval_loss),
            "operation": self.operation, "jobs": self.jobs,
            "contributors": [c.__dict__ for c in self.contributors],
            "loss_history": [[int(v), _num(loss)] for v, loss in self.loss_history],
        }


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def readme(card: Card) -> str:
    """The card as a Hugging Face README.md (YAML front matter, then prose and tables)."""
    lines = ["---", f"base_model: {card.base_model}", "library_name: transformers", "tags:", "- nomoat",
             "- lora-folded", "---", "", f"# nomoat model, version {card.version}", "",
             (f"Fine-tuned from **{card.base_model}** by nomoat: many volunteers' LoRA adapters, each trained "
              "on a shard of the jobs below, folded exactly into the weights."), "",
             f"- lineage: `{card.lineage}`",
             f"- version: {card.version} (parent: {card.parent if card.parent >= 0 else 'none, the base model'})"]
    if card.operation:
        lines.append(f"- made by: {card.operation}")
    loss = _num(card.eval_loss)
    lines += [f"- held-out loss: {loss:.4f}" if loss is not None else "- held-out loss: not measured", ""]
    lines += ["## Jobs and datasets", ""]
    if card.jobs:
        lines += ["| job | name | dataset sha256 |", "|---|---|---|"]
        lines += [f"| {j['job_id']} | {j['name']} | `{j['dataset_sha256']}` |" for j in card.jobs]
    else:
        lines.append("None folded into this version.")
    lines += ["", "## Contributors (weight in this version)", ""]
    if card.contributors:
        lines += ["| worker | adapters | weight |", "|---|---|---|"]
        lines += [f"| {c.worker} | {c.adapters} | {c.weight:.4f} |" for c in card.contributors]
    else:
        lines.append("None: this version adds no adapter.")
    lines += ["", "## Held-out loss history", "", "| version | loss |", "|---|---|"]
    lines += [f"| {int(v)} | {'-' if _num(x) is None else f'{x:.4f}'} |" for v, x in card.loss_history]
    lines += ["", f"The same, machine-readable: `{MANIFEST}`.", ""]
    return "\n".join(lines)


def render(card: Card) -> dict[str, bytes]:
    return {README: readme(card).encode(), MANIFEST: json.dumps(card.to_json(), indent=2).encode()}


def contributors(adapters: list[tuple[str, str, float]], names: Mapping[str, str]) -> list[Contributor]:
    """(adapter id, worker id, weight) of a version's adapters -> one line per worker, heaviest first."""
    by: dict[str, list[float]] = {}
    for _, worker_id, weight in adapters:
        by.setdefault(worker_id, []).append(weight)
    out = [Contributor(names.get(w) or w or "(unnamed)", w, len(ws), float(sum(ws))) for w, ws in by.items()]
    return sorted(out, key=lambda c: (-c.weight, c.worker_id))


def make(ledger, store, *, base_model: str, lineage: str, version: int, parent: int, eval_loss: float,
         folded: list[tuple[str, float]], job_ids: list[str], operation: str = "") -> dict[str, str]:
    """Write the card of a version about to be published into ``store``: {file: sha256}.

    ``folded``: (adapter id, weight) of its adapters. The loss history is read from the parent's
    card (one small blob), not from every version before it."""
    records = ledger.adapters.many([a for a, _ in folded]) if folded else []
    workers = {r.adapter_id: r.worker for r in records}
    names = {}
    for w in set(workers.values()):
        found = ledger.workers.get(w) if w else None
        names[w] = found.name if found is not None and found.name else w
    jobs = []
    for job_id in job_ids:
        job = ledger.jobs.get(job_id)
        if job is not None:
            jobs.append({"job_id": job_id, "name": job.name, "dataset_sha256": job.dataset,
                         "records_sha256": job.records})
    history = _history(ledger, store, parent) + [[version, eval_loss]]
    card = Card(base_model, lineage, version, parent, eval_loss, operation, jobs,
                contributors([(a, workers.get(a, ""), w) for a, w in folded], names), history[-HISTORY_KEPT:])
    return {name: store.put(data) for name, data in render(card).items()}


def _history(ledger, store, parent: int) -> list[list[float]]:
    record = ledger.versions.get(parent) if parent >= 0 else None
    if record is None:
        return []
    sha = (record.metrics.get(CARD_KEY) or {}).get(MANIFEST)
    if sha:
        try:
            return list(json.loads(store.get(sha))["loss_history"])
        except (FileNotFoundError, ValueError, KeyError):
            pass
    return [[parent, record.eval_loss]]


def files_of(record) -> dict[str, str]:
    """The card files a version's record names ({} for a version made before cards)."""
    found = record.metrics.get(CARD_KEY) if record is not None else None
    return dict(found) if isinstance(found, dict) else {}
