"""Logs: a real fold, lease and upload write one line per state change, as JSON or as sentences."""

from __future__ import annotations

import io
import json
import logging
import time

import pytest

from coordinator.collect import accept

from coordinator.schedule import holder
from nomoat import logs
from tests.test_history import Rig as FoldRig


@pytest.fixture
def capture():
    """Installs nomoat's logging for the test (into a buffer) and puts the old handlers back."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buffers: list[io.StringIO] = []

    def start(fmt: str) -> io.StringIO:
        buffers.append(io.StringIO())
        logs.setup(fmt, logging.INFO, stream=buffers[-1])
        return buffers[-1]

    yield start
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])


def json_lines(buffer: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]


def test_a_fold_logs_its_version_contributions_and_loss_as_json(ledger, tmp_path, capture) -> None:
    rig = FoldRig(ledger, tmp_path)
    out = capture("json")
    ids = [rig.offer(rig.adapter()), rig.offer(rig.adapter())]
    assert rig.folder.maybe_fold(set()) == 1
    lines = json_lines(out)  # every line parses: nothing but JSON objects
    (fold,) = [line for line in lines if line["event"] == "version.folded"]
    assert {"ts", "level", "logger", "event", "message"} <= set(fold)
    assert fold["level"] == "info" and fold["logger"] == "nomoat.fold"
    assert fold["version"] == 1 and fold["parent"] == 0 and fold["job"] == rig.job and fold["jobs"] == [rig.job]
    assert sorted(c["adapter"] for c in fold["contributions"]) == sorted(ids)
    assert sum(c["weight"] for c in fold["contributions"]) == pytest.approx(1.0, abs=1e-5)
    version = rig.ledger.versions.get(1)
    assert fold["loss"] == pytest.approx(version.eval_loss)
    assert fold["parent_loss"] == pytest.approx(version.metrics["parent_loss"])
    assert abs(fold["ts"] - time.time()) < 600


def test_a_fold_in_the_plain_format_is_a_sentence(ledger, tmp_path, capture) -> None:
    rig = FoldRig(ledger, tmp_path)
    out = capture("plain")
    rig.offer(rig.adapter())
    rig.offer(rig.adapter())
    rig.folder.maybe_fold(set())
    version = rig.ledger.versions.get(1)
    expected = (f"folded version 1 from 2 adapters (jobs {rig.job}): held-out loss "
                f"{version.metrics['parent_loss']:.4f} -> {version.eval_loss:.4f}")
    assert expected in out.getvalue(), out.getvalue()
    assert "{" not in out.getvalue()


def test_rollback_and_a_refused_adapter_are_logged(ledger, tmp_path, capture) -> None:
    rig = FoldRig(ledger, tmp_path)
    out = capture("json")
    rig.offer(rig.adapter())
    harmful = rig.offer(rig.adapter(scale=0.02 * 1000**0.5))  # 1000 times a normal update
    assert rig.folder.maybe_fold(set()) == 1
    rig.folder.rollback(0)
    lines = json_lines(out)
    refused = [line for line in lines if line["event"] in ("adapter.rejected", "adapter.dropped")]
    assert [line["adapter"] for line in refused] == [harmful] and refused[0]["reason"]
    assert refused[0]["job"] == rig.job and refused[0]["level"] == "warning"
    (rolled,) = [line for line in lines if line["event"] == "version.rollback"]
    assert rolled["version"] == 2 and rolled["target"] == 0


def test_lease_start_and_upload_answers_are_logged_with_their_ids(ledger, tmp_path, capture) -> None:
    rig = FoldRig(ledger, tmp_path)
    out = capture("json")
    task_id = rig.ledger.leases.pending(1)[0]
    fence = rig.ledger.leases.lease(task_id, time.time() + 60, 0, max_attempts=3)
    from coordinator.gateway.auth import Identity

    admin = Identity(role="admin", name="admin", token_hash="")
    assert holder.heartbeat(rig.ledger, rig.settings, admin, "w-1", task_id, fence).ok
    assert holder.heartbeat(rig.ledger, rig.settings, admin, "w-1", task_id, fence).ok  # not a second start
    stale = accept.Manifest(task_id=task_id, fence=fence + 7, base_version=0, rank=2, alpha=8.0, tokens=10,
                             train_loss=1.0, sha256="0" * 64, size=10, worker_id="w-1")
    accept.log_answer(stale, accept.precheck(rig.ledger, task_id, fence + 7, "0" * 64))
    lines = json_lines(out)
    (started,) = [line for line in lines if line["event"] == "task.started"]
    assert (started["task"], started["worker"], started["fence"]) == (task_id, "w-1", fence)
    (refused,) = [line for line in lines if line["event"] == "upload.refused"]
    assert refused["task"] == task_id and "stale fence" in refused["reason"] and refused["level"] == "warning"


def test_an_unknown_format_is_a_sentence() -> None:
    with pytest.raises(ValueError, match="--log-format must be one of plain, json"):
        logs.setup("xml")
