"""The whole loop, driven through the command line as the three kinds of user drive it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from nomoat import packing
from nomoat.demo import DEMO_DATA
from tests.procs import Proc, free_port, run

pytestmark = pytest.mark.slow


def held_out_loss(folder: Path, texts: list[str]) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    return packing.mean_loss(model, packing.pack(tokenizer, texts, 128))


def test_submit_train_fold_pull_through_the_cli(tmp_path: Path) -> None:
    from nomoat.tiny import tiny_model_path

    lines = DEMO_DATA.read_text(encoding="utf-8").splitlines()
    random.Random(1).shuffle(lines)
    train, test = lines[:700], [json.loads(line)["text"] for line in lines[700:850]]
    dataset = tmp_path / "train.jsonl"
    dataset.write_text("\n".join(train) + "\n", encoding="utf-8")

    data_dir, address = tmp_path / "coordinator", f"127.0.0.1:{free_port()}"
    # Replication off: the two volunteers' tokens differ, so 5 % of tasks would also run a replica,
    # an extra run that the exact count of runs below would see (tests/test_replication.py has them).
    coordinator = Proc(["coordinator", "start", "--data-dir", str(data_dir), "--listen", address,
                        "--fold-every", "2", "--tokens-per-task", "6000", "--replicate-fraction", "0"],
                       tmp_path / "coordinator.log")
    workers: list[Proc] = []
    try:
        coordinator.wait_for("volunteers join with", timeout=240)
        assert "nomoat worker start" in coordinator.output()
        env = {"NOMOAT_COORDINATOR": address}
        admin = {**env, "NOMOAT_TOKEN": (data_dir / "admin.token").read_text().strip()}
        worker_env = {"NOMOAT_TOKEN": (data_dir / "trusted-worker.token").read_text().strip()}
        # The second volunteer joins with a token of its own, issued by the admin.
        own = run(["token", "create", "--role", "trusted-worker", "--name", "volunteer-1"], admin, timeout=60)
        assert own.returncode == 0, own.stderr
        tokens = [worker_env, {"NOMOAT_TOKEN": own.stdout.strip()}]
        for i, card in enumerate(("RTX 3060:12", "RTX 4090:24")):
            # the way the coordinator's printed join command passes the address
            workers.append(Proc(["worker", "start", "--ray", "--coordinator", address, "--simulate-gpu", card, "--threads", "1",
                                 "--name", f"volunteer-{i}", "--cache-dir", str(tmp_path / f"cache-{i}")],
                                tmp_path / f"worker-{i}.log", env=tokens[i]))
            workers[-1].wait_for("joined", timeout=180)

        submitted = run(["submit", str(dataset), "--name", "e2e", "--wait"], admin, timeout=900)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        assert "done" in submitted.stdout

        status = json.loads(run(["status", "--json"], admin, timeout=60).stdout)
        (job,) = status["jobs"]
        assert job["state"] == "done" and job["tasks"]["done"] == job["totalTasks"] >= 2
        cards = {w["card"]["name"] for w in status["workers"]}
        assert cards == {"RTX 3060", "RTX 4090"}
        assert sum(w["tasksDone"] for w in status["workers"]) == job["totalTasks"]
        versions = status["versions"]
        assert len(versions) >= 2 and versions[0]["version"] == 0
        assert all(v["parent"] == v["version"] - 1 for v in versions[1:])

        pulled = run(["pull", "--out", str(tmp_path / "model")], admin, timeout=300)
        assert pulled.returncode == 0, pulled.stderr
        assert held_out_loss(tmp_path / "model", test) < held_out_loss(tiny_model_path(), test)

        # The history is kept: a rollback and an unmerge are new versions with lineage.
        newest = versions[-1]["version"]
        assert run(["admin", "rollback", "1"], worker_env | env, timeout=60).returncode != 0  # not an admin
        rolled = run(["admin", "rollback", "1"], admin, timeout=300)
        assert rolled.returncode == 0 and f"version {newest + 1} has the weights of version 1" in rolled.stdout
        first_adapter = versions[1]["adapterIds"][0]
        unmerged = run(["admin", "unmerge", first_adapter], admin, timeout=300)
        assert unmerged.returncode == 0, unmerged.stderr
        after = json.loads(run(["status", "--json"], admin, timeout=60).stdout)["versions"]
        assert [v.get("operation", "") for v in after[-2:]] == ["rollback", "unmerge"]
        assert after[-1]["parent"] == newest + 1
    finally:
        codes = [w.interrupt() for w in workers] + [coordinator.interrupt()]
    assert "worker left the cluster" in workers[0].output()
    assert codes == [0] * len(codes), codes


def test_unreachable_coordinator_is_a_sentence(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "no completion"}\n', encoding="utf-8")
    # Nobody listens on this port: the user gets a sentence, not a traceback.
    result = run(["submit", str(bad)], {"NOMOAT_COORDINATOR": f"127.0.0.1:{free_port()}"}, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "cannot reach the coordinator" in result.stderr
