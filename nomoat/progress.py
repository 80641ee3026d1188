"""What people see while long work runs: the progress bars of ``submit --wait`` and ``pull``,
and a worker's bar for the unit it trains (step, loss, tokens/s), fed through a small file by the
process that trains. ``nomoat status`` is nomoat.statusview."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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
from rich.table import Column

from nomoat.client import CoordinatorClient
from nomoat.v1 import nomoat_pb2 as pb

console = Console(stderr=True)


def _loss(value: float) -> str:
    return "-" if value is None or math.isnan(value) or value == 0.0 else f"{value:.4f}"


def job_bar(out: Console) -> Progress:
    """The bar of ``submit --wait``: its detail wraps instead of being cut at 80 columns (a
    pipe's width too)."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}", table_column=Column(overflow="fold", ratio=1)), TimeElapsedColumn(),
        console=out, transient=False,
    )


def follow(client: CoordinatorClient, job_id: str, grace_s: float = 60.0) -> pb.JobInfo:
    """Show a job's progress until it finishes; returns its final state.

    Returns early, the job still running, when it has carried a warning (its tasks fit no card
    in the cluster) for ``grace_s`` seconds: waiting on would hang until a bigger card joins.
    """
    job = None
    with job_bar(console) as bar:
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


# -- a worker's current task ------------------------------------------------------------------


@dataclass(frozen=True)
class TaskProgress:
    """Where the unit a worker trains stands: written by the process that trains it, read by the
    worker's own terminal (in Ray mode those are two processes: the Ray task and the agent)."""

    task_id: str
    step: int
    total: int
    loss: float
    tokens_per_s: float
    pid: int
    note: str = ""  # e.g. "resting for --max-power"

    def detail(self) -> str:
        return f"loss {_loss(self.loss)}  {self.tokens_per_s:,.0f} tokens/s" + (f"  {self.note}" if self.note else "")

    def line(self) -> str:
        return f"step {self.step}/{self.total}  {self.detail()}"


class ProgressFile:
    """``TaskProgress`` as a small JSON file, replaced atomically at each step; gone between units."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def write(self, progress: TaskProgress) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(progress)))
        tmp.replace(self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def read(self) -> TaskProgress | None:
        """The unit in training, or None (none, or the process that wrote it is gone)."""
        try:
            progress = TaskProgress(**json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        try:
            os.kill(progress.pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return progress


class TaskBar:
    """The worker's terminal line for its current unit: a bar with step, loss and tokens/s.

    Drawn only on a terminal (a service's log gets the per-unit log lines instead); log lines
    print above it (nomoat.logs writes to the stderr rich redirects while it draws).
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._bar: Progress | None = None
        self._row = None
        self._task = ""

    @property
    def enabled(self) -> bool:
        return self.console.is_terminal

    def show(self, progress: TaskProgress | None, waiting: str = "") -> None:
        """Draw ``progress`` (None: no unit now; ``waiting`` says why, e.g. a pause)."""
        if not self.enabled:
            return
        if self._bar is None:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[detail]}"), console=self.console, transient=True)
            self._bar.start()
            self._row = self._bar.add_task("waiting for work", total=None, detail="")
        if progress is None:
            self._bar.update(self._row, description=waiting or "waiting for work", total=None, completed=0,
                             detail="")
            return
        self._bar.update(self._row, description=progress.task_id, total=progress.total, completed=progress.step,
                         detail=progress.detail())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
