"""What people see: the progress bars of ``submit --wait`` and ``pull``, and the tables of ``status``."""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.filesize import decimal
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from nomoat.client import CoordinatorClient
from nomoat.v1 import nomoat_pb2 as pb

console = Console(stderr=True)


def _loss(value: float) -> str:
    return "-" if value is None or math.isnan(value) or value == 0.0 else f"{value:.4f}"


def follow(client: CoordinatorClient, job_id: str, grace_s: float = 60.0) -> pb.JobInfo:
    """Show a job's progress until it finishes; returns its final state.

    Returns early, the job still running, when it has carried a warning (its tasks fit no card
    in the cluster) for ``grace_s`` seconds: waiting on would hang until a bigger card joins.
    """
    job = None
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console, transient=False,
    ) as bar:
        row = bar.add_task(job_id, total=None, detail="")
        while True:
            for update in client.watch(job_id):
                job = update.job
                t = job.tasks
                bar.update(row, total=job.total_tasks, completed=t.done + t.failed,
                           detail=(f"version {update.current_version}  eval loss {_loss(update.eval_loss)}  "
                                   f"folded {job.adapters_folded}  leased {t.leased}  failed {t.failed}"
                                   + (f"  [yellow]{job.warning}" if job.warning else "")))
                if update.finished or job.warning:
                    break
            if job is None or job.state != "running" or not job.warning:
                break
            # Watch only speaks on change, and a job that fits nowhere does not change: poll.
            since = time.monotonic()
            while job.warning and job.state == "running" and time.monotonic() - since < grace_s:
                time.sleep(0.5)
                job = client.status(job_id).jobs[0]
            if job.warning or job.state != "running":
                break
    if job is None:
        raise RuntimeError("the coordinator sent no progress")
    return job


def print_status(reply: pb.StatusReply) -> None:
    out = Console()
    jobs = Table(title="jobs")
    for col in ("job", "name", "state", "tasks done/total", "pending", "leased", "failed", "folded",
                "rejected", "base loss", "error", "warning"):
        jobs.add_column(col)
    for j in reply.jobs:
        jobs.add_row(j.job_id, j.name, j.state, f"{j.tasks.done}/{j.total_tasks}", str(j.tasks.pending),
                     str(j.tasks.leased), str(j.tasks.failed), str(j.adapters_folded), str(j.adapters_rejected),
                     _loss(j.base_loss), j.error, j.warning)
    workers = Table(title="workers")
    for col in ("worker", "name", "card", "VRAM GB", "backend", "tasks done", "state", "seen"):
        workers.add_column(col)
    now = time.time()
    for w in reply.workers:
        card = w.card.name + (" (simulated)" if w.card.simulated else "")
        workers.add_row(w.worker_id, w.name, card, f"{w.card.vram_gb:g}", w.card.backend, str(w.tasks_done),
                        w.state, f"{now - w.last_seen:.0f} s ago")
    versions = Table(title="versions")
    for col in ("version", "parent", "adapters", "eval loss", "jobs"):
        versions.add_column(col)
    for v in reply.versions:
        versions.add_row(str(v.version), "-" if v.parent < 0 else str(v.parent), str(v.adapters),
                         _loss(v.eval_loss), v.job_id)
    for table in (jobs, workers, versions):
        out.print(table)
    for j in reply.jobs:
        if j.training:
            out.print(f"[bold]{j.job_id}[/]: its tasks train at {j.training}", highlight=False)
        if j.noise_scale > 0:
            out.print(f"[bold]{j.job_id}[/]: gradient noise scale {j.noise_scale:.3g} sequences "
                      "(about the batch beyond which a larger one buys little)", highlight=False)
        if j.events:
            out.print(f"[bold]{j.job_id}[/]: latest notes from its runs")
            for event in j.events:
                out.print(f"  {event}", markup=False, highlight=False)


class PullBar:
    """What ``nomoat pull`` shows (a :class:`nomoat.transfer.Progress`): on a terminal, one bar
    with the bytes, the rate and the time left; anywhere else (piped, a log file) no bar, one line
    per file as it lands and a summary at the end, so a log gets a few lines, not thousands."""

    def __init__(self, out: Console | None = None) -> None:
        self.console = out or console
        self.live = self.console.is_terminal
        self._bar: Progress | None = None
        self._row = None
        self._began = 0.0
        self._received = 0
        self._kept = 0
        self._listed: set[str] = set()

    def __enter__(self) -> PullBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def start(self, header: pb.PullHeader, held: int, note: str) -> None:
        total = sum(e.size for e in header.files)
        if note:
            self.console.print(f"[yellow]{note}")
        if not self._began:  # the first try; a retry's held bytes arrived in the tries before it
            self._began, self._kept = time.monotonic(), held
            if held and not self.live:
                self.console.print(f"resuming: {decimal(held)} of {decimal(total)} are here from an earlier pull",
                                   highlight=False)
        if not self.live:
            return
        if self._bar is None:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=self.console)
            self._bar.start()
            self._row = self._bar.add_task(f"version {header.version}", total=total, completed=held)
        else:
            self._bar.update(self._row, description=f"version {header.version}", total=total, completed=held)

    def advance(self, n: int) -> None:
        self._received += n
        if self._bar is not None:
            self._bar.advance(self._row, n)

    def file_done(self, path: str, size: int) -> None:
        if not self.live and path not in self._listed:
            self._listed.add(path)
            self.console.print(f"  {path}  {decimal(size)}", highlight=False, markup=False)

    def retry(self, reason: str, delay: float) -> None:
        self.console.print(f"{reason}; resuming in {delay:.1f} s", highlight=False, markup=False)

    def finish(self, header: pb.PullHeader) -> None:
        self.__exit__()
        took = max(time.monotonic() - self._began, 1e-6)
        kept = f", {decimal(self._kept)} kept from an earlier pull" if self._kept else ""
        self.console.print(f"pulled version {header.version}: {decimal(self._received)} in {took:.1f} s "
                           f"({decimal(int(self._received / took))}/s){kept}", highlight=False)
