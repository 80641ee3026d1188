"""Which files a pull sends, called directly (no gRPC): plans, their errors, and the blocks.

Version 0 of the rig is the tiny base model; catch-up across folded versions is covered by
tests/test_history.py through the real Pull call.
"""

from __future__ import annotations

import hashlib

import pytest

from coordinator.model import pull
from coordinator.errors import InvalidRequest, NotFound
from nomoat.v1 import nomoat_pb2 as pb
from tests.rig import Rig, published, rig  # noqa: F401  (fixtures)


def plan(rig: Rig, fmt: int = pull.Format.HF, since: int = 0, version: int = -1) -> pull.PullPlan:
    return pull.plan(rig.ledger, rig.deps.history, rig.store, fmt, since, version)


def test_the_formats_are_the_protos() -> None:
    assert {f.name: f.value for f in pull.Format} == dict(pb.PullRequest.Format.items())


def test_a_folder_pull_sends_the_versions_files_but_not_the_fp32_master(rig: Rig) -> None:
    got = plan(rig)
    expected = {p: sha for p, sha in rig.v0_files.items() if not p.startswith("nomoat-")}
    card = {f.path: f.sha256 for f in got.files if f.path in ("README.md", "nomoat.json")}
    assert len(card) == 2  # and its model card (issue 20): a complete Hugging Face folder
    expected.update(card)
    assert got.version == 0
    assert {f.path: f.sha256 for f in got.files} == expected
    assert all(f.size == rig.store.size(f.sha256) and f.data is None for f in got.files)
    sent: dict[str, bytes] = {}
    for path, offset, block in pull.blocks(rig.store, got, 1 << 16):
        assert offset == len(sent.get(path, b""))
        sent[path] = sent.get(path, b"") + block
    assert {p: hashlib.sha256(b).hexdigest() for p, b in sent.items()} == expected


def test_a_catch_up_from_the_version_itself_sends_nothing(rig: Rig) -> None:
    assert plan(rig, pull.Format.PATCHES, since=0).files == []


@pytest.mark.parametrize("fmt, since, version, error, message", [
    (pull.Format.HF, 0, 7, NotFound, "there is no version 7"),
    (9, 0, 0, InvalidRequest, "unknown pull format 9; this coordinator knows HF, PEFT, PATCHES"),
    (pull.Format.PATCHES, 3, 0, InvalidRequest, "version 3 is newer than version 0"),
    (pull.Format.PEFT, 0, 0, InvalidRequest, "a PEFT patch needs 0 <= since < version"),
])
def test_a_pull_that_cannot_be_served_says_why(rig: Rig, fmt, since, version, error, message) -> None:
    with pytest.raises(error, match=message.replace("(", r"\(")):
        plan(rig, fmt, since, version)


def test_made_up_files_are_sent_from_memory_in_blocks(rig: Rig) -> None:
    data = b"hello"
    made = pull.PullPlan(1, [pull.PullFile("a.json", len(data), hashlib.sha256(data).hexdigest(), data)])
    assert list(pull.blocks(rig.store, made, 2)) == [("a.json", 0, b"he"), ("a.json", 2, b"ll"), ("a.json", 4, b"o")]
