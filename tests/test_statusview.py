"""``nomoat status`` as people see it: 80 columns, piped output, --json for scripts."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from rich.console import Console

from nomoat import statusview
from nomoat.v1 import nomoat_pb2 as pb

NOW = 1_800_000_000.0
JOB_IDS = ("j-e3f09a1c", "j-77b2c4d0")


def reply() -> pb.StatusReply:
    """A status with everything that makes lines long: long names, warnings, notes, many jobs."""
    jobs = [
        pb.JobInfo(job_id=JOB_IDS[0], name="big-chat-dataset-from-the-forum", state="failed",
                   tasks=pb.TaskCounts(pending=0, leased=0, done=37, failed=3), total_tasks=40,
                   adapters_folded=30, adapters_rejected=7, error="every task failed; see `nomoat status`",
                   created=NOW - 600, tokens=1_310_720, base_loss=4.2687,
                   warning="its tasks need a card with at least 30.5 GB of VRAM, but the largest of the 2 cards "
                           "in the cluster has 24 GB; they wait until a bigger card joins",
                   events=["t-e3f09a1c-0007: out of memory at micro-batch 8 on RTX 3060 (12 GB); retrying at 4"],
                   training="batch 2, lr 0.00283 (the job's batch 8 over 4 adapters a fold, lr x1.41)"),
        pb.JobInfo(job_id=JOB_IDS[1], name="", state="running", tasks=pb.TaskCounts(pending=5, leased=2, done=1),
                   total_tasks=8, created=NOW - 30, tokens=262_144, base_loss=float("nan")),
    ]
    workers = [pb.WorkerInfo(worker_id="w-0badc0de", name="volunteer-with-a-long-hostname-0",
                             card=pb.Card(name="NVIDIA GeForce RTX 4090 Laptop GPU", vram_gb=16, simulated=True),
                             last_seen=NOW - 2, tasks_done=12, state="active"),
               pb.WorkerInfo(worker_id="w-feedf00d", name="lab-1",
                             card=pb.Card(name="A100", vram_gb=80, backend="cuda", loads_4bit=True),
                             last_seen=NOW - 4000, tasks_done=0, state="gone")]
    versions = [pb.VersionInfo(version=0, parent=-1, eval_loss=0.0),
                pb.VersionInfo(version=1, parent=0, eval_loss=4.18, adapters=4, job_id=",".join(JOB_IDS),
                               adapter_ids=["a-1", "a-2", "a-3", "a-4"]),
                pb.VersionInfo(version=2, parent=1, eval_loss=4.05, operation="rollback")]
    return pb.StatusReply(jobs=jobs, workers=workers, versions=versions)


def rendered(console: Console, message: pb.StatusReply | None = None) -> str:
    statusview.print_status(message or reply(), console, now=NOW)
    return console.file.getvalue()


def check_readable(text: str, width: int) -> None:
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width, "\n".join(lines)
    assert "…" not in text, text  # rich's ellipsis: something was cut
    for job_id in JOB_IDS:  # ids whole, each on one line
        assert re.search(rf"(^|\s){job_id}(\s|,|$)", text, re.M), job_id
    for worker_id in ("w-0badc0de", "w-feedf00d"):
        assert worker_id in text
    words = " ".join(text.split())
    for must in ("37 of 40 done", "every task failed", "out of memory at micro-batch 8", "30 folded, 7 refused",
                 "NVIDIA GeForce RTX 4090 Laptop GPU (simulated)", "they wait until a bigger card joins",
                 "volunteer-with-a-long-hostname-0", "4.2687", "rollback", "1 active, 1 gone", "80 GB, cuda, 4-bit"):
        assert must in words or must.replace(" ", "") in words.replace(" ", ""), must


def test_status_fits_an_80_column_terminal_and_cuts_nothing() -> None:
    console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    check_readable(rendered(console), 80)


def test_status_piped_is_plain_text_of_80_columns() -> None:
    # What `nomoat status | less` gets: rich sees no terminal (no width from it, no colours).
    console = Console(file=io.StringIO(), highlight=False)
    assert not console.is_terminal
    text = rendered(console)
    assert "\x1b[" not in text
    check_readable(text, 80)


def test_a_field_the_renderer_does_not_know_is_still_shown() -> None:
    # A newer coordinator's field (here the JobInfo's dataset hash, standing in: the renderer
    # hides it by name) shows under its own name once it is not in the known list.
    message = reply()
    known = statusview.JOB_FIELDS
    try:
        statusview.JOB_FIELDS = known - {"dataset_sha256"}
        message.jobs[0].dataset_sha256 = "ab" * 32
        text = rendered(Console(file=io.StringIO(), width=80), message)
    finally:
        statusview.JOB_FIELDS = known
    assert "dataset sha256" in text and "abab" in text


def test_json_keys_are_the_documented_ones() -> None:
    data = json.loads(statusview.as_json(reply()))
    doc = (Path(__file__).parents[1] / "docs" / "status-json.md").read_text()
    documented = set(re.findall(r"^\| `([a-zA-Z0-9.]+)` \|", doc, re.M))
    assert documented, "docs/status-json.md lists no keys"
    present = set()
    for section in ("jobs", "workers", "versions"):
        present.add(section)
        for item in data[section]:
            for key, value in item.items():
                present.add(f"{section}.{key}")
                if isinstance(value, dict):
                    present.update(f"{section}.{key}.{k}" for k in value)
    missing = documented - present
    assert not missing, f"documented but not in the output: {sorted(missing)}"
    assert data["jobs"][0]["jobId"] == JOB_IDS[0] and data["jobs"][0]["totalTasks"] == 40


def test_a_throttled_or_excluded_worker_says_why_in_80_columns() -> None:
    message = reply()
    message.workers[0].trust, message.workers[0].trust_score = "throttled", 0.4
    message.workers[0].trust_reason = ("throttled (trust 0.40): 4 of its last 8 contributions failed the checks "
                                       "(norm 3, disagreed 1); one task at a time, each one replicated")
    message.workers[1].trust = "trusted"
    console = Console(file=io.StringIO(), width=80, highlight=False)
    text = rendered(console, message)
    check_readable(text, 80)
    words = " ".join(text.split())
    assert "trust throttled (trust 0.40): 4 of its last 8 contributions failed" in words, text
    assert "1 active, 1 gone, 1 throttled" in words
    assert words.count("trust ") == 2  # the throttled one's line (two "trust" words); the trusted one has none
