"""What a Ray head started by an earlier, killed coordinator leaves behind is cleaned up."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nomoat import raynode as node


def _record(tmp_path: Path, pgid: int, temp_dir: Path) -> Path:
    record = tmp_path / "ray-head.json"
    record.write_text(json.dumps({"pgid": pgid, "temp_dir": str(temp_dir)}))
    return record


def test_leftover_session_dir_is_removed_with_its_processes(tmp_path):
    temp_dir = Path(tempfile.mkdtemp(prefix="nomoat-ray-"))
    (temp_dir / "session").mkdir()
    held = temp_dir / "session" / "raylet.out"
    held.write_text("")
    # A stand-in for a lingering Ray agent: its own process group, holding a file in the temp dir.
    proc = subprocess.Popen([sys.executable, "-c", f"f = open({str(held)!r}); import time; time.sleep(60)"],
                            start_new_session=True)
    try:
        fds = Path(f"/proc/{proc.pid}/fd")
        for _ in range(100):  # until it has the file open
            if any(str(held) == str(f.readlink()) for f in fds.iterdir() if f.is_symlink()):
                break
            time.sleep(0.05)
        record = _record(tmp_path, proc.pid, temp_dir)
        assert node.stop_leftovers(record) == 1
        assert proc.wait(timeout=10) != 0
        assert not temp_dir.exists() and not record.exists()
    finally:
        proc.kill()


def test_a_record_pointing_elsewhere_removes_nothing(tmp_path):
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "keep").write_text("x")
    record = _record(tmp_path, 2**22 + 12345, precious)  # a process group no process is in
    assert node.stop_leftovers(record) == 0
    assert (precious / "keep").exists()
    assert not record.exists()
