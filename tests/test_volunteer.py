"""A volunteer pauses and resumes a real worker (Ray mode), and the coordinator's JSON log tells
the whole story, one parseable line per state change."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from nomoat.demo import DEMO_DATA
from tests.procs import Proc, coordinator, free_port, run, wait_until, worker

pytestmark = pytest.mark.slow


def status(env: dict[str, str]) -> dict:
    done = run(["status", "--json"], env, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_paused_worker_takes_no_work_and_the_json_log_records_every_step(tmp_path: Path) -> None:
    lines = DEMO_DATA.read_text(encoding="utf-8").splitlines()
    random.Random(2).shuffle(lines)
    dataset = tmp_path / "train.jsonl"
    dataset.write_text("\n".join(lines[:300]) + "\n", encoding="utf-8")
    data_dir, address = tmp_path / "coordinator", f"127.0.0.1:{free_port()}"
    boss = coordinator(data_dir, address, tmp_path / "coordinator.log", "--fold-every", "2",
                       "--tokens-per-task", "6000", "--log-format", "json")
    volunteer: Proc | None = None
    try:
        boss.wait_for("volunteers join with", timeout=240)
        admin = {"NOMOAT_COORDINATOR": address, "NOMOAT_TOKEN": (data_dir / "admin.token").read_text().strip()}
        volunteer = worker(address, data_dir, tmp_path, "volunteer")
        volunteer.wait_for("joined", timeout=180)
        cache = str(tmp_path / "cache-volunteer")

        paused = run(["worker", "pause", "--cache-dir", cache], {}, timeout=60)
        assert paused.returncode == 0, paused.stderr
        volunteer.wait_for("left the Ray cluster until it may train again", timeout=120)
        submitted = run(["submit", str(dataset), "--name", "paused"], admin, timeout=120)
        assert submitted.returncode == 0, submitted.stderr
        time.sleep(10)  # rounds of the scheduler: nothing may be placed on the paused worker
        (job,) = status(admin)["jobs"]
        assert job["tasks"]["leased"] == 0 and job["tasks"]["pending"] == job["totalTasks"] >= 2, job

        resumed = run(["worker", "resume", "--cache-dir", cache], {}, timeout=60)
        assert resumed.returncode == 0 and "resumed" in resumed.stdout
        volunteer.wait_for("resumes", timeout=60)
        wait_until(lambda: status(admin)["jobs"][0]["state"] != "running", 900, "the job to finish", every=3)
        (job,) = status(admin)["jobs"]
        assert job["state"] == "done", job
    finally:
        codes = ([volunteer.interrupt()] if volunteer else []) + [boss.interrupt()]
    assert codes == [0] * len(codes), codes

    records = []
    for line in boss.output().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))  # every log line is one JSON object
        else:
            assert " nomoat." not in line, f"a log line not in JSON: {line}"
    events = {r["event"] for r in records}
    assert {"job.submitted", "worker.registered", "task.leased", "task.started", "upload.accepted",
            "version.folded", "job.done"} <= events, events
    job_id = job["jobId"]
    leased = [r for r in records if r["event"] == "task.leased"]
    assert leased and all(r["job"] == job_id and r["task"] and r["worker"] for r in leased)
    folds = [r for r in records if r["event"] == "version.folded"]
    assert all(r["contributions"] and r["loss"] < r["parent_loss"] + 0.05 for r in folds)
    assert "task.failed" not in events  # the pause cost no attempt
    assert "pauses: paused by `nomoat worker pause`" in volunteer.output()
