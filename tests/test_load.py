"""The load benchmark as a CI check: 1,000 simulated outbound volunteers, from two load-generator
processes, against a real coordinator over loopback, for a short load phase; nothing lost,
nothing leased or accepted twice (bench/load.py checks the ledger and says so in its last line).
The figures themselves are the benchmark's, not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_thousand_outbound_workers_lose_nothing_and_lease_nothing_twice(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load.py"), "--volunteers", "1000", "--procs", "2", "--seconds", "20",
         "--baseline-seconds", "5", "--records", "3000"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    ledger = figures["ledger"]
    assert figures["registered"] == 1000, figures
    assert figures["units_uploaded"] > 0 and figures["leases_per_s"] > 0, figures
    assert (figures["double_leased"], figures["double_accepted"], figures["lost"]) == (0, 0, 0), ledger
    assert figures["volunteers"] == 1000 and figures["calls"] > 0, figures
    assert ledger["accepted_seen"] == ledger["done_in_ledger"] == ledger["buffered"], ledger
    assert figures["ok"] is True, figures
    # No heartbeat or registration is ever refused for capacity (their lane is not shared with streams).
    by_kind = figures["capacity_refusals_by_kind"]
    assert not by_kind.get("Heartbeat") and not by_kind.get("Register"), by_kind
