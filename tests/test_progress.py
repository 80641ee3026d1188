"""A worker's progress line for the unit it trains: written by the training process, drawn by the agent."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from nomoat.progress import ProgressFile, TaskBar, TaskProgress
from worker.controls import Controls, ControlSettings
from worker.task import step_reporter
from worker.trainer import TrainSpec


def test_each_step_writes_the_units_step_loss_and_speed(tmp_path: Path) -> None:
    progress = ProgressFile(tmp_path / "progress.json")
    on_step = step_reporter("t-1", TrainSpec(seq_len=128, batch_size=2), Controls(ControlSettings(tmp_path)),
                            progress)
    on_step(3, 10, 2.5)
    now = progress.read()
    assert (now.task_id, now.step, now.total, now.loss, now.pid) == ("t-1", 3, 10, 2.5, os.getpid())
    assert now.tokens_per_s > 0
    assert now.line().startswith("step 3/10  loss 2.5000  ") and now.line().endswith("tokens/s")
    progress.clear()
    assert progress.read() is None


def test_a_unit_whose_process_is_gone_is_not_shown(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    progress = ProgressFile(tmp_path / "progress.json")
    progress.write(TaskProgress("t-1", 1, 2, 3.0, 10.0, pid=int(dead.stdout)))
    assert progress.read() is None


def test_the_bar_draws_on_a_terminal_and_stays_out_of_a_log(tmp_path: Path) -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True, width=100)
    bar = TaskBar(terminal)
    bar.show(TaskProgress("t-e3f09a1c-0007", 5, 32, 3.91, 1234.0, os.getpid()))
    bar.close()
    drawn = terminal.file.getvalue()
    assert "t-e3f09a1c-0007" in drawn and "5/32" in drawn and "1,234 tokens/s" in drawn
    log = Console(file=io.StringIO())  # a service's output: no terminal
    quiet = TaskBar(log)
    quiet.show(TaskProgress("t-1", 5, 32, 3.91, 1234.0, os.getpid()))
    quiet.close()
    assert log.file.getvalue() == ""


def test_the_job_bar_wraps_its_detail_at_80_columns() -> None:
    from nomoat.progress import job_bar

    out = Console(file=io.StringIO(), width=80)
    detail = "version 12  eval loss 4.0485  folded 40  leased 3  failed 1  [a long warning about cards]"
    with job_bar(out) as bar:
        row = bar.add_task("j-9659b49f", total=40, detail=detail)
        bar.update(row, completed=37)
    text = out.file.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert "j-9659b49f" in text and "failed 1" in " ".join(text.split())
