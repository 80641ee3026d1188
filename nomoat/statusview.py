"""``nomoat status`` for people: readable in an 80-column terminal and when piped.

Jobs are one block each (a line of identity, then label/value lines that wrap rather than cut),
workers and versions are narrow tables. Ids are never shortened. The layout reads the reply as
data: a field this module does not know yet (one a newer coordinator sends, say a worker's
trust) is still shown, under its own name, so a new proto field needs no change here to appear.

``--json`` prints :func:`as_json`: the proto3 JSON mapping of ``StatusReply`` (docs/status-json.md
lists the keys); those names are the proto's field names and never change meaning.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table
from rich.text import Text

from nomoat.v1 import nomoat_pb2 as pb

# Fields shown by name in their own place; any other field is shown generically (see _extras).
JOB_FIELDS = {"job_id", "name", "state", "tasks", "total_tasks", "adapters_folded", "adapters_rejected", "error",
              "created", "tokens", "dataset_sha256", "base_loss", "warning", "events", "training",
              "noise_scale"}
WORKER_FIELDS = {"worker_id", "name", "card", "last_seen", "tasks_done", "state", "trust", "trust_score",
                 "trust_reason"}
VERSION_FIELDS = {"version", "parent", "eval_loss", "adapters", "created", "job_id", "adapter_ids", "operation"}


def as_json(reply: pb.StatusReply) -> str:
    """What ``nomoat status --json`` prints: every field, defaults included, camelCase keys."""
    return json.dumps(MessageToDict(reply, always_print_fields_with_no_presence=True), indent=2)


def _fields(message: Message) -> dict[str, Any]:
    """A message as plain data by proto field name, defaults included."""
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def loss(value: float | str | None) -> str:
    if isinstance(value, str):  # the JSON mapping writes NaN as a string
        value = float(value)
    return "-" if value is None or math.isnan(value) or value == 0.0 else f"{value:.4f}"


def ago(then: float, now: float) -> str:
    if then <= 0:
        return "never"
    s = max(0.0, now - then)
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 90 * 60:
        return f"{s / 60:.0f} min ago"
    if s < 36 * 3600:
        return f"{s / 3600:.0f} h ago"
    return f"{s / 86400:.0f} days ago"


def _label(key: str) -> str:
    return key.replace("_", " ")


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_value(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{_label(k)} {_value(v)}" for k, v in value.items() if v not in ("", 0, [], {}))
    return str(value)


def _extras(data: dict[str, Any], known: set[str]) -> list[tuple[str, str]]:
    """(label, text) for the fields not shown by name; empty and zero values are left out."""
    return [(_label(k), _value(v)) for k, v in data.items() if k not in known and v not in ("", 0, 0.0, [], {}, False)]


def _grid() -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True, style="dim")
    grid.add_column(overflow="fold")
    return grid


def job_block(job: pb.JobInfo, now: float) -> Table:
    """One job: its id, name and state, then one labelled line per thing there is to say."""
    d = _fields(job)
    t = job.tasks
    head = Text.assemble((job.job_id, "bold"), "  ", job.name or "(no name)", "  ",
                         (job.state, {"done": "green", "failed": "red"}.get(job.state, "yellow")))
    grid = _grid()
    grid.add_row("tasks", f"{t.done} of {job.total_tasks} done, {t.leased} training, {t.pending} waiting, "
                          f"{t.failed} failed")
    grid.add_row("adapters", f"{job.adapters_folded} folded, {job.adapters_rejected} refused")
    grid.add_row("data", f"{job.tokens:,} tokens, submitted {ago(job.created, now)}")
    grid.add_row("base loss", loss(job.base_loss))
    if job.training:
        grid.add_row("trains at", job.training)
    if job.noise_scale > 0:  # coordinator.schedule.noise: about the batch beyond which a larger one buys little
        grid.add_row("noise scale", f"{job.noise_scale:.3g} sequences (gradient noise scale B_simple)")
    if job.warning:
        grid.add_row("warning", Text(job.warning, style="yellow"))
    if job.error:
        grid.add_row("error", Text(job.error, style="red"))
    for label, text in _extras(d, JOB_FIELDS):
        grid.add_row(label, text)
    for i, event in enumerate(job.events):
        grid.add_row("notes" if i == 0 else "", Text(event))
    return _indented(head, grid)


def _indented(head: Text, body: Table) -> Table:
    """``head``, then ``body`` two columns in: each wrapped line stays under its own label."""
    indent = Table.grid()
    indent.add_column(width=2)
    indent.add_column(overflow="fold")
    indent.add_row("", body)
    block = Table.grid()
    block.add_column(overflow="fold")
    block.add_row(head)
    block.add_row(indent)
    return block


def worker_block(worker: pb.WorkerInfo, now: float) -> Table:
    """One worker: id, name and state, then its card and work (and any field not known here)."""
    head = Text.assemble((worker.worker_id, "bold"), "  ", worker.name, "  ",
                         (worker.state, "green" if worker.state == "active" else "dim"),
                         f", seen {ago(worker.last_seen, now)}")
    card = worker.card
    grid = _grid()
    grid.add_row("card", f"{card.name}{' (simulated)' if card.simulated else ''}, {card.vram_gb:g} GB"
                         + (f", {card.backend}" if card.backend else "")
                         + (", 4-bit" if card.loads_4bit else ""))  # it trains bases too big for it in NF4
    grid.add_row("tasks", f"{worker.tasks_done} done")
    if worker.trust and worker.trust != "trusted":  # its volunteer's work keeps failing the checks: say why
        grid.add_row("trust", Text(worker.trust_reason or worker.trust,
                                   style="red" if worker.trust == "excluded" else "yellow"))
    for label, text in _extras(_fields(worker), WORKER_FIELDS):
        grid.add_row(label, text)
    return _indented(head, grid)


def versions_table(versions: list[pb.VersionInfo]) -> Table:
    extra_keys: list[str] = []
    rows = []
    for v in versions:
        d = _fields(v)
        rows.append((v, d))
        extra_keys += [k for k, x in d.items() if k not in VERSION_FIELDS and k not in extra_keys]
    table = Table(title="versions", title_justify="left", box=None, pad_edge=False)
    table.add_column("version", justify="right", no_wrap=True)
    table.add_column("parent", justify="right", no_wrap=True)
    table.add_column("adapters", justify="right", no_wrap=True)
    table.add_column("eval loss", no_wrap=True)
    table.add_column("from", overflow="fold")
    for key in extra_keys:
        table.add_column(_label(key), overflow="fold")
    for v, d in rows:
        origin = v.operation or (v.job_id.replace(",", ", ") if v.version else "the base model")
        table.add_row(str(v.version), "-" if v.parent < 0 else str(v.parent), str(v.adapters), loss(v.eval_loss),
                      origin, *(_value(d.get(k, "")) for k in extra_keys))
    return table


def print_status(reply: pb.StatusReply, console: Console | None = None, now: float | None = None) -> None:
    """The whole status: a block per job, then the workers and the versions."""
    out = console or Console(highlight=False)
    now = time.time() if now is None else now
    out.print(Text("jobs" if reply.jobs else "jobs: none yet", style="bold"))
    for job in reply.jobs:
        out.print(job_block(job, now))
    out.print()
    active = sum(1 for w in reply.workers if w.state == "active")
    standing = [f"{sum(1 for w in reply.workers if w.trust == level)} {level}" for level in ("probation", "throttled", "excluded")
                if any(w.trust == level for w in reply.workers)]
    out.print(Text(f"workers: {active} active, {len(reply.workers) - active} gone" + "".join(f", {s}" for s in standing)
                   if reply.workers else "workers: none yet", style="bold"))
    for worker in reply.workers:
        out.print(worker_block(worker, now))
    out.print()
    out.print(versions_table(list(reply.versions)))
