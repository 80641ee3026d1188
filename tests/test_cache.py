"""The worker's cache over real gRPC: a build cut off is resumed by the next process that builds
the version (a fixed download name, one builder per version), and what unfinished builds of
older versions left is swept once a newer version is in place."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import pytest

from coordinator.model import pull
from coordinator.ledger import VersionRecord
from nomoat import adapter as fmt
from nomoat import lineage, lora
from tests.rig import Rig, make_adapter, published, rig  # noqa: F401  (fixtures)
from tests.test_transfer import Counter, Cut, served, small_blocks, total  # noqa: F401  (fixture)
from worker.cache import ModelCache


@pytest.fixture
def sent(monkeypatch) -> list[int]:
    """Bytes the coordinator streamed, one entry per pull."""
    real, counts = pull.blocks, []

    def blocks(*args, **kwargs):
        counts.append(0)
        for item in real(*args, **kwargs):
            counts[-1] += len(item[2])
            yield item

    monkeypatch.setattr(pull, "blocks", blocks)
    return counts


def cut_after(monkeypatch, n_bytes: int) -> None:
    """The next build's pull stops after ``n_bytes`` (as a worker stopped mid-download would)."""
    monkeypatch.setattr(ModelCache, "_bar", staticmethod(lambda: contextlib.nullcontext(Counter(after=n_bytes))))


def name_of(rig: Rig) -> str:
    return rig.deps.history.lineage().id


def leftovers(cache: ModelCache, name: str) -> list[str]:
    return sorted(p.name for p in (cache.root / name).glob(".*"))


def test_a_build_cut_off_is_resumed_by_another_process(rig: Rig, tmp_path: Path, monkeypatch, sent) -> None:
    name, whole = name_of(rig), total(rig)
    shown = ModelCache.__dict__["_bar"]  # the staticmethod itself
    cut_after(monkeypatch, whole // 2)
    with pytest.raises(Cut):
        ModelCache(tmp_path / "cache").ensure(rig.client("worker"), name, 0)
    monkeypatch.setattr(ModelCache, "_bar", shown)
    # A new ModelCache over the same folder: what a worker started again (or another task) has.
    folder = ModelCache(tmp_path / "cache").ensure(rig.client("worker"), name, 0)
    assert lineage.problem(folder, name, 0) == ""
    assert lineage.folder_files(folder) == served(rig)
    first, second = sent
    assert first >= whole // 2 and second <= whole - whole // 2  # what arrived was not sent again


def test_one_process_builds_a_version_while_another_waits_for_it(rig: Rig, tmp_path: Path, sent) -> None:
    name, folders, errors = name_of(rig), [], []

    def build() -> None:
        try:
            folders.append(ModelCache(tmp_path / "cache").ensure(rig.client("worker"), name, 0))
        except Exception as exc:  # noqa: BLE001  (reported by the assertion below)
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(folders) == 3 and len(set(folders)) == 1
    assert len(sent) == 1  # one pull: the two others waited and used its folder


def test_what_unfinished_builds_of_older_versions_left_is_swept(rig: Rig, tmp_path: Path, monkeypatch) -> None:
    name, cache = name_of(rig), ModelCache(tmp_path / "cache")
    cut_after(monkeypatch, total(rig) // 2)
    with pytest.raises(Cut):
        cache.ensure(rig.client("worker"), name, 0)
    assert leftovers(cache, name) == ["..build-0.partial", ".0.lock"]
    monkeypatch.undo()
    shapes = {m: s for m, s in rig.deps.shapes.items() if m.endswith(("q_proj", "v_proj"))}
    patch = lora.build_patch([fmt.from_bytes(make_adapter(shapes, seed=3))], [1.0])
    rig.ledger.versions.publish(VersionRecord(version=1, parent=0, patch=rig.store.put(fmt.to_bytes(patch))))
    folder = cache.ensure(rig.client("worker"), name, 1)
    assert lineage.problem(folder, name, 1) == ""
    assert leftovers(cache, name) == [".1.lock"]  # version 0's half download is gone; 1's lock stays
