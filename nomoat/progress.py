"""What people see while long work runs: the progress bar of ``submit --wait`` (``status`` is
nomoat.statusview)."""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
