"""``nomoat demo``: the whole loop on one machine, in a few minutes on a laptop CPU.

1. A coordinator with its embedded Redis and a Ray head, serving the tiny model (version 0).
2. Two volunteers with different simulated cards join the Ray cluster as worker nodes.
3. A job: the shipped corpus (Debian fortunes about computers and science), 90% submitted, 10%
   kept aside by the demo as a test set nobody trains on.
4. Tasks train LoRA adapters on the workers; the coordinator folds them into new versions.
5. The newest version is pulled as a Hugging Face folder and evaluated on the test set.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nomoat.client import CoordinatorClient

DEMO_DATA = Path(__file__).parent / "data" / "demo.jsonl"
CARDS = ("RTX 3060:12:13", "RTX 4090:24:82")
console = Console()


def split_demo_data(workdir: Path, test_fraction: float = 0.1) -> tuple[Path, list[str]]:
    lines = DEMO_DATA.read_text(encoding="utf-8").splitlines()
    random.Random(0).shuffle(lines)
    n_test = int(len(lines) * test_fraction)
    train = workdir / "fortunes-train.jsonl"
    train.write_text("\n".join(lines[n_test:]) + "\n", encoding="utf-8")
    return train, [json.loads(line)["text"] for line in lines[:n_test]]


def start_worker(address: str, token: str, card: str, workdir: Path, index: int) -> subprocess.Popen:
    log = open(workdir / f"worker-{index}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nomoat.cli", "--coordinator", address, "worker", "start", "--ray",
         "--simulate-gpu", card, "--name", f"volunteer-{index}", "--threads", "1",
         "--cache-dir", str(workdir / f"worker-{index}")],
        env={**os.environ, "NOMOAT_TOKEN": token}, stdout=log, stderr=subprocess.STDOUT,
    )
    proc.log_path = Path(log.name)
    log.close()
    return proc


def wait_for_workers(procs: list[subprocess.Popen], timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while not all(b"joined" in p.log_path.read_bytes() for p in procs):
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a demo worker exited early; see worker-*.log in the demo folder")
        if time.monotonic() > end:
            raise RuntimeError(f"the demo workers did not join within {timeout:.0f} s")
        time.sleep(1)


def test_losses(folders: dict[str, Path], texts: list[str], seq_len: int = 128) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nomoat import packing

    losses = {}
    for label, folder in folders.items():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
        losses[label] = packing.mean_loss(model, packing.pack(tokenizer, texts, seq_len))
    return losses


def run_demo(workdir: Path | None = None, listen: str = "127.0.0.1:0") -> dict[str, float]:
    from coordinator.server import Coordinator
    from coordinator.settings import Settings
    from nomoat.progress import follow
    from nomoat.tiny import tiny_model_path

    workdir = Path(workdir or tempfile.mkdtemp(prefix="nomoat-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]nomoat demo[/] in {workdir}")
    # The coordinator's own defaults, job settings included: what the demo shows is what a user
    # gets (with two cards, each task trains at half the job's batch at lr x sqrt(2): Settings.
    # keep_global_batch).
    settings = Settings(data_dir=workdir / "coordinator", listen=listen)
    node = Coordinator(settings)
    workers: list[subprocess.Popen] = []
    try:
        console.print("starting the coordinator (embedded Redis, Ray head, tiny model) ...")
        node.start()
        console.print(f"coordinator at {node.address}; starting two volunteers: {', '.join(CARDS)} ...")
        for i, card in enumerate(CARDS):  # one at a time: two Ray nodes starting at once can time out
            workers.append(start_worker(node.address, node.trusted_token, card, workdir, i))
            wait_for_workers(workers)
        with CoordinatorClient(node.address, node.admin_token) as client:
            train, test = split_demo_data(workdir)
            reply = client.submit(train, name="fortunes")
            console.print(f"job {reply.job_id}: {reply.records} records, {reply.tokens} tokens, {reply.tasks} tasks")
            job = follow(client, reply.job_id)
            if job.state != "done":
                raise RuntimeError(f"the demo job {job.state}: {job.error}")
            status = client.status()
            model_dir = workdir / "model"
            number = client.pull(model_dir)
        console.print(f"pulled version {number} into {model_dir}")
        losses = test_losses({"base (version 0)": tiny_model_path(), f"version {number}": model_dir}, test)
        _report(status, job, losses)
        return losses
    finally:
        for proc in workers:
            proc.send_signal(2)  # Ctrl-C: the worker leaves the cluster cleanly
        for proc in workers:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        node.stop()


def _report(status, job, losses: dict[str, float]) -> None:
    table = Table(title="held-out loss by version (coordinator's validation slice)")
    table.add_column("version")
    table.add_column("adapters folded")
    table.add_column("eval loss")
    table.add_row("0 (base)", "-", f"{job.base_loss:.4f}")
    for v in status.versions:
        if v.version > 0:
            table.add_row(str(v.version), str(v.adapters), f"{v.eval_loss:.4f}")
    console.print(table)
    test = Table(title="loss on the demo's own test set (never trained on)")
    test.add_column("model")
    test.add_column("loss")
    for label, loss in losses.items():
        test.add_row(label, f"{loss:.4f}")
    console.print(test)
