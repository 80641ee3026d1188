"""The README's multi-machine example, as printed, with TLS on: a coordinator listening on every
interface makes its own CA; a volunteer runs the join line the coordinator printed, word for word
(plus a simulated card), joins as a volunteer of its own and trains; the admin's connection
string submits a job and lists the volunteer. Whole processes, real gRPC over TLS."""

from __future__ import annotations

import json
import random
import re
import shlex
import stat
from pathlib import Path

import pytest

from nomoat.demo import DEMO_DATA
from tests.procs import Proc, coordinator, free_port, run, wait_until

pytestmark = pytest.mark.slow


def printed_line(output: str, after: str) -> str:
    lines = output.splitlines()
    return next(lines[i + 1].strip() for i, line in enumerate(lines) if line.startswith(after))


def test_the_printed_join_line_works_with_tls_on(tmp_path: Path) -> None:
    rows = DEMO_DATA.read_text(encoding="utf-8").splitlines()
    random.Random(3).shuffle(rows)
    dataset = tmp_path / "train.jsonl"
    dataset.write_text("\n".join(rows[:80]) + "\n", encoding="utf-8")
    port = free_port()
    data_dir = tmp_path / "coordinator"
    config = {"NOMOAT_CONFIG_DIR": str(tmp_path / "config")}  # the volunteer's ~/.config/nomoat
    boss = coordinator(data_dir, f"0.0.0.0:{port}", tmp_path / "coordinator.log", "--public-address",
                       f"127.0.0.1:{port}", "--fold-every", "2", "--tokens-per-task", "4000", "--http", "off")
    volunteer: Proc | None = None
    try:
        boss.wait_for("volunteers join with", timeout=240)
        out = boss.output()
        fingerprint = re.search(r"--ca-fingerprint (sha256:[0-9a-f]{64})", out).group(1)
        join = printed_line(out, "volunteers join with")
        assert "NOMOAT_TOKEN=nmt_j_" in join and f"--ca-fingerprint {fingerprint}" in join, join
        assert (data_dir / "join.code").read_text().strip() in join
        # The join line as printed: NAME=VALUE nomoat worker start ...; a simulated card, this machine has none.
        words = shlex.split(join)
        env = dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w))
        argv = [w for w in words if not re.match(r"^[A-Z_]+=", w)]
        assert argv[:3] == ["nomoat", "worker", "start"], argv
        volunteer = Proc([*argv[1:], "--simulate-gpu", "RTX 3060:12", "--threads", "1", "--name", "home",
                          "--cache-dir", str(tmp_path / "cache")], tmp_path / "volunteer.log", env={**env, **config})
        volunteer.wait_for("joined", timeout=180)
        (kept,) = (tmp_path / "config" / "credentials").glob("*.json")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and json.loads(kept.read_text())["ca_fingerprint"] == fingerprint

        admin_line = printed_line(out, "admin token:")
        admin = dict(w.split("=", 1) for w in shlex.split(admin_line.replace("$(cat ", "").replace(")", "")))
        admin["NOMOAT_TOKEN"] = Path(admin["NOMOAT_TOKEN"]).read_text().strip()
        admin.update(config)
        assert admin["NOMOAT_CA_FINGERPRINT"] == fingerprint
        submitted = run(["submit", str(dataset), "--name", "tls"], admin, timeout=120)
        assert submitted.returncode == 0, submitted.stderr

        def finished() -> bool:
            done = run(["status", "--json"], admin, timeout=60)
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)["jobs"][0]["state"] != "running"

        wait_until(finished, 900, "the job to finish", every=3)
        listed = run(["volunteer", "list", "--json"], admin, timeout=60)
        assert listed.returncode == 0, listed.stderr
        (home,) = [v for v in json.loads(listed.stdout) if v["role"] == "volunteer"]
        assert home["name"] == "home" and home["workerIds"]
        # Without the fingerprint, a client is told what it lacks in a sentence.
        plain = run(["status"], {**admin, "NOMOAT_CA_FINGERPRINT": ""}, timeout=60)
        assert plain.returncode == 1 and "--ca-fingerprint" in plain.stderr and "Traceback" not in plain.stderr
    finally:
        codes = ([volunteer.interrupt()] if volunteer else []) + [boss.interrupt()]
    assert codes == [0] * len(codes), codes
