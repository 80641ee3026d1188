"""Pull transfer over real loopback gRPC: the framing, resuming after a cut, a version that moved
on, a damaged partial file, retries on a dropped connection, and what the progress display prints.

The server is the rig's (tests/rig.py: the coordinator's own gRPC server in this process); pulls
are cut by the client itself, the way Ctrl-C or a dropped link cuts them: a progress reporter
that raises after N bytes, or one that stops the server mid-stream. Blocks are made small
(``pull.CHUNK``) so that the tiny model's 4 MB weights take many messages.
"""

from __future__ import annotations

import hashlib
import io
import threading
import types
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from coordinator.model import pull
from coordinator.ledger import VersionRecord
from coordinator.server import bind, grpc_server
from nomoat import framing, lineage, transfer
from nomoat import partial as partial_folder
from nomoat.client import NomoatError
from nomoat.progress import PullBar
from nomoat.v1 import nomoat_pb2 as pb
from tests.rig import Rig, published, rig  # noqa: F401  (fixtures)

BLOCK = 64 << 10
WEIGHTS = "model.safetensors"


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch) -> None:
    monkeypatch.setattr(pull, "CHUNK", BLOCK)


@pytest.fixture
def stall(monkeypatch):
    """The server's first stream stops sending after ``stall.after`` bytes until released, so a
    test that drops the connection there knows no more bytes were on their way."""
    real = pull.blocks
    state = types.SimpleNamespace(after=None, release=threading.Event(), calls=0)

    def blocks(*args, **kwargs):
        state.calls += 1
        first, sent = state.calls == 1, 0
        for item in real(*args, **kwargs):
            if first and state.after is not None and sent >= state.after:
                state.release.wait(30)
                return
            yield item
            sent += len(item[2])

    monkeypatch.setattr(pull, "blocks", blocks)
    yield state
    state.release.set()


class Cut(Exception):
    """The pull was stopped by the test (as by Ctrl-C)."""


class Counter:
    """A Progress that counts what arrives and, optionally, does something after ``after`` bytes."""

    def __init__(self, after: int | None = None, then=None) -> None:
        self.after, self.then = after, then
        self.received = 0
        self.starts: list[tuple[int, int, str]] = []  # (version, held, note) per try
        self.done: list[str] = []
        self.retries: list[str] = []

    def start(self, header: pb.PullHeader, held: int, note: str) -> None:
        self.starts.append((header.version, held, note))

    def advance(self, n: int) -> None:
        self.received += n
        if self.after is not None and self.received >= self.after:
            self.after = None
            (self.then or self._cut)()

    @staticmethod
    def _cut() -> None:
        raise Cut()

    def file_done(self, path: str, size: int) -> None:
        self.done.append(path)

    def retry(self, reason: str, delay: float) -> None:
        self.retries.append(reason)

    def finish(self, header: pb.PullHeader) -> None:
        pass


def served(rig: Rig, version: int = 0) -> dict[str, str]:
    """path -> sha256 of what a pull of ``version`` writes: its files (the fp32 master stays
    behind) and its model card."""
    planned = pull.plan(rig.ledger, rig.deps.history, rig.store, pull.Format.HF, 0, version)
    return {f.path: f.sha256 for f in planned.files}


def total(rig: Rig, version: int = 0) -> int:
    return sum(rig.store.size(s) for s in served(rig, version).values())


def partial_of(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def assert_pulled(out: Path, files: dict[str, str]) -> None:
    assert lineage.folder_files(out) == files
    assert not partial_of(out).exists()


def cut_pull(rig: Rig, out: Path, after: int, version: int = 0) -> int:
    """Start a pull and stop it after ``after`` bytes; returns the bytes the partial folder kept."""
    with pytest.raises(Cut):
        rig.client("reader").pull(out, version, progress=Counter(after))
    return sum(p.stat().st_size for p in partial_of(out).rglob("*") if p.name != partial_folder.STATE)


# -- framing ----------------------------------------------------------------------------------


@given(st.text(max_size=40), st.integers(0, 2**63), st.binary(max_size=3000))
def test_a_framed_chunk_is_the_protobuf_message(path: str, offset: int, data: bytes) -> None:
    made = pb.PullChunk(file=pb.FileChunk(path=path, offset=offset, data=data))
    framed = framing.file_chunk(path, offset, data)
    assert pb.PullChunk.FromString(framed) == made  # what any protobuf client reads
    for wire in (framed, made.SerializeToString()):  # and what this client reads of either
        block = framing.decode(wire)
        assert (block.path, block.offset, bytes(block.data)) == (path, offset, data)


def test_a_header_and_garbage_are_told_apart() -> None:
    header = pb.PullHeader(version=3, lineage="l", files=[pb.FileEntry(path="a", size=1, sha256="x", offset=1)])
    assert framing.decode(pb.PullChunk(header=header).SerializeToString()) == header
    for garbage in (b"\x12\x05ab", b"\x12\x80", b"\xff\xff", b""):
        with pytest.raises(framing.PullError, match="malformed"):
            framing.decode(garbage)


def test_the_server_resumes_only_the_same_file_within_its_size() -> None:
    plan = pull.PullPlan(1, [pull.PullFile("a", 10, "sha-a"), pull.PullFile("b", 10, "sha-b")])
    asked = [("a", "sha-a", 4), ("b", "another", 4), ("c", "sha-c", 4), ("a", "sha-a", 0)]
    assert pull.starts(plan, asked) == {"a": 4}
    assert pull.starts(plan, [("b", "sha-b", 11)]) == {}
    made = pull.PullPlan(1, [pull.PullFile("m", 5, "x", b"hello")])
    assert list(pull.blocks(None, made, 2, {"m": 3})) == [("m", 3, b"lo")]


# -- resuming ---------------------------------------------------------------------------------


def test_a_cut_pull_resumes_and_sends_only_the_rest(rig: Rig) -> None:
    out = rig.tmp / "model"
    held = cut_pull(rig, out, after=total(rig) // 2)
    assert 0 < held < total(rig)
    assert not out.exists()  # the target is never half-written
    state = partial_folder.State.read(partial_of(out) / partial_folder.STATE)
    assert (state.version, state.lineage) == (0, rig.deps.history.lineage().id)
    assert {p: sha for p, (sha, _) in state.files.items()} == served(rig)

    again = Counter()
    assert rig.client("reader").pull(out, progress=again) == 0
    assert again.starts == [(0, held, "")]
    assert again.received == total(rig) - held  # not a byte of what was kept is sent again
    assert_pulled(out, served(rig))
    assert lineage.problem(out, rig.deps.history.lineage().id, 0) == ""  # stamped as pulled whole


def test_a_dropped_connection_is_retried_and_resumed_in_the_same_call(rig: Rig, stall) -> None:
    """The server goes away mid-stream and comes back on the same port a moment later."""
    port = rig.address.rsplit(":", 1)[1]
    servers = []
    stall.after = 8 * BLOCK

    def drop() -> None:
        rig.server.stop(0)
        stall.release.set()

        def come_back() -> None:
            server, _ = grpc_server(rig.deps)
            bind(server, f"127.0.0.1:{port}")
            server.start()
            servers.append(server)

        threading.Timer(0.3, come_back).start()

    seen = Counter(after=stall.after, then=drop)
    try:
        out = rig.tmp / "model"
        assert rig.client("reader").pull(out, progress=seen, patience_s=30) == 0
    finally:
        for server in servers:
            server.stop(0)
    assert len(seen.retries) >= 1
    assert len(seen.starts) == len(seen.retries) + 1 and seen.starts[-1][1] > 0  # the last try resumed
    assert seen.received == total(rig)  # every byte came once
    assert_pulled(out, served(rig))


def test_a_version_that_moved_on_keeps_only_the_files_it_shares(rig: Rig) -> None:
    out = rig.tmp / "model"
    cut_pull(rig, out, after=total(rig) // 2, version=-1)  # the newest: version 0
    weights = bytearray(rig.store.get(served(rig)[WEIGHTS]))
    weights[-1] ^= 1
    v1 = dict(rig.ledger.versions.get(0).files, **{WEIGHTS: rig.store.put(bytes(weights))})
    rig.ledger.versions.publish(VersionRecord(version=1, parent=0, files=v1))

    again = Counter()
    assert rig.client("reader").pull(out, progress=again) == 1
    [(version, held, note)] = again.starts
    assert version == 1 and "now serves version 1, not the version 0 this pull began with" in note
    before = served(rig, 0)
    kept = sum(rig.store.size(sha) for path, sha in served(rig, 1).items() if path < WEIGHTS and before[path] == sha)
    assert held == kept  # the files before the weights arrived whole in the first try, and those that are the same stay
    assert again.received == total(rig, 1) - kept  # the changed weights came again from their start
    assert_pulled(out, served(rig, 1))


def test_a_damaged_partial_file_is_found_and_fetched_again(rig: Rig) -> None:
    out = rig.tmp / "model"
    cut_pull(rig, out, after=total(rig) // 2)
    part = partial_of(out) / WEIGHTS
    damaged = bytearray(part.read_bytes())
    assert damaged
    damaged[len(damaged) // 2] ^= 0xFF
    part.write_bytes(bytes(damaged))

    again = Counter()
    assert rig.client("reader").pull(out, progress=again) == 0
    assert len(again.retries) == 1 and "was damaged" in again.retries[0]
    assert again.starts[0][1] > 0 and again.starts[1][1] < again.starts[0][1]  # the weights started over
    assert_pulled(out, served(rig))


def test_a_refused_pull_is_not_retried_and_leaves_nothing(rig: Rig) -> None:
    out = rig.tmp / "model"
    seen = Counter()
    with pytest.raises(NomoatError, match="there is no version 7"):
        rig.client("reader").pull(out, 7, progress=seen)
    assert seen.retries == [] and not out.exists() and not partial_of(out).exists()


def test_a_pull_gives_up_after_its_patience_and_keeps_what_arrived(rig: Rig, stall) -> None:
    out = rig.tmp / "model"
    stall.after = 8 * BLOCK

    def drop() -> None:
        rig.server.stop(0)
        stall.release.set()

    seen = Counter(after=stall.after, then=drop)
    with pytest.raises(NomoatError, match="run the same pull again to resume"):
        rig.client("reader").pull(out, progress=seen, patience_s=1.5)
    assert seen.retries and any(p.stat().st_size for p in partial_of(out).rglob("*.safetensors"))


def test_two_pulls_into_one_folder_do_not_mix(tmp_path: Path) -> None:
    with partial_folder.Partial(tmp_path / "model"):
        with pytest.raises(transfer.PullError, match="another pull into .* is under way"):
            partial_folder.Partial(tmp_path / "model").__enter__()


def test_a_file_damaged_on_the_way_is_refused(rig: Rig) -> None:
    """A blob altered in the store after its sha256 was recorded: the pull says so, keeps nothing."""
    blob = rig.store.path(served(rig)["config.json"])
    blob.write_bytes(blob.read_bytes().replace(b"{", b"[", 1))
    out = rig.tmp / "model"
    with pytest.raises(NomoatError, match="config.json arrived damaged"):
        rig.client("reader").pull(out)
    assert not out.exists() and not (partial_of(out) / "config.json").exists()


# -- what a person sees ---------------------------------------------------------------------------


def test_the_progress_is_a_few_lines_when_not_on_a_terminal(rig: Rig) -> None:
    out_text = io.StringIO()
    shown = Console(file=out_text, force_terminal=False, width=100)
    out = rig.tmp / "model"
    held = cut_pull(rig, out, after=total(rig) // 2)
    with PullBar(shown) as bar:
        rig.client("reader").pull(out, progress=bar)
    lines = out_text.getvalue().splitlines()
    files = served(rig)
    assert "\r" not in out_text.getvalue() and "\x1b" not in out_text.getvalue()  # no redrawn bar
    assert lines[0].startswith("resuming: ") and len(lines) == 1 + len(files) + 1
    assert sorted(line.split()[0] for line in lines[1:-1]) == sorted(files)
    got = total(rig) - held
    assert lines[-1].startswith(f"pulled version 0: {got / 1e6:.1f} MB in ")
    assert lines[-1].endswith("kept from an earlier pull")


def test_the_progress_bar_shows_bytes_and_rate_on_a_terminal(rig: Rig) -> None:
    out_text = io.StringIO()
    shown = Console(file=out_text, force_terminal=True, width=100)
    with PullBar(shown) as bar:
        rig.client("reader").pull(rig.tmp / "model", progress=bar)
    text = out_text.getvalue()
    assert "version 0" in text and "MB/s" in text and f"{total(rig) / 1e6:.1f} MB" in text


def test_sha256_of_resumed_files_covers_the_kept_prefix(rig: Rig) -> None:
    """Resumed twice in a row at different points, the file still checks out whole."""
    out = rig.tmp / "model"
    cut_pull(rig, out, after=total(rig) // 4)
    with pytest.raises(Cut):
        rig.client("reader").pull(out, progress=Counter(total(rig) // 4))
    rig.client("reader").pull(out)
    data = (out / WEIGHTS).read_bytes()
    assert hashlib.sha256(data).hexdigest() == served(rig)[WEIGHTS]


def test_nomoat_pull_resumes_and_prints_a_line_per_file_when_piped(rig: Rig) -> None:
    from click.testing import CliRunner

    from nomoat.cli import main

    out = rig.tmp / "model"
    held = cut_pull(rig, out, after=total(rig) // 2)
    result = CliRunner().invoke(main, ["--coordinator", rig.address, "--token", rig.tokens["reader"],
                                       "pull", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"version 0 written to {out}\n"
    lines = result.stderr.splitlines()
    assert lines[0] == f"resuming: {held / 1e6:.1f} MB of {total(rig) / 1e6:.1f} MB are here from an earlier pull"
    assert len(lines) == len(served(rig)) + 2 and lines[-1].startswith("pulled version 0: ")
    assert_pulled(out, served(rig))


def test_a_resumed_catch_up_whose_plan_changed_leaves_no_stale_folder(tmp_path: Path) -> None:
    """A catch-up cut while it sent a snapshot, resumed when the cheapest way is patches alone:
    no empty snapshot/ may appear (the worker cache takes one as the folder to start from)."""
    with partial_folder.Partial(tmp_path / "download") as partial:
        first = pb.PullHeader(version=2, lineage="l", files=[pb.FileEntry(path="snapshot/model.safetensors",
                                                                          size=8, sha256="a" * 64)])
        partial.adopt(first, pull.Format.PATCHES, 0)
        (partial.dir / "snapshot").mkdir()
        (partial.dir / "snapshot" / "model.safetensors").write_bytes(b"half")  # what arrived before the cut
        [point] = partial.resume_points(pull.Format.PATCHES, 0)
        assert (point.path, point.offset) == ("snapshot/model.safetensors", 4)
        later = pb.PullHeader(version=2, lineage="l", files=[pb.FileEntry(path="patches/000001.safetensors",
                                                                          size=8, sha256="b" * 64)])
        partial.adopt(later, pull.Format.PATCHES, 0)
        assert not (partial.dir / "snapshot").exists()
        assert partial.resume_points(pull.Format.PEFT, 0) == [] and not any(partial.dir.rglob("*.safetensors"))
