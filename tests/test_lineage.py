"""Model lineages over real gRPC: one worker cache and one outbox serving two coordinators whose
base models share an architecture, a cached folder altered on disk, the lineage in the ledger."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from coordinator.model.history import History
from coordinator.ledger import Ledger, VersionRecord
from coordinator.model.running import RunningModel
from coordinator.model.store import BlobStore
from nomoat import adapter as fmt
from nomoat import lineage, lora
from nomoat.client import NomoatError
from nomoat.tiny import tiny_model_path
from nomoat.v1 import nomoat_pb2 as pb
from tests.rig import ALPHA, RANK, SECRET, Published, Rig, make_adapter, published, start  # noqa: F401  (fixture)
from worker import uploader
from worker.cache import ModelCache

CARD = pb.Card(name="RTX 3060", vram_gb=12.0)


@pytest.fixture(scope="module")
def other_published(tmp_path_factory) -> Published:
    """Another base model of the same architecture: the tiny model with its attention changed."""
    folder = tmp_path_factory.mktemp("other") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path())
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_path()).save_pretrained(folder)
    running = RunningModel(folder)
    blobs = tmp_path_factory.mktemp("other-v0") / "blobs"
    files = running.publish(BlobStore(blobs))
    shapes = {name: (m.out_features, m.in_features) for name, m in running.model.named_modules()
              if isinstance(m, torch.nn.Linear)}
    return Published(running, blobs, files, shapes)


@pytest.fixture
def two(redis_server, redis_client, published, other_published, tmp_path) -> Iterator[tuple[Rig, Rig]]:
    """Two coordinators, each with its own ledger (Redis databases 0 and 1) and base model."""
    other_redis = redis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + "/1")
    other_redis.flushdb()
    a = start(redis_client, published, tmp_path / "a")
    b = start(other_redis, other_published, tmp_path / "b")
    yield a, b
    a.close()
    b.close()
    other_redis.close()


@pytest.fixture
def rig_a(redis_client, published, tmp_path) -> Iterator[Rig]:
    r = start(redis_client, published, tmp_path / "a")
    yield r
    r.close()


def lineage_of(rig: Rig) -> str:
    """The lineage a worker learns from the coordinator (here from registering)."""
    return rig.client("worker").register("volunteer", CARD).lineage


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_second_coordinator_of_the_same_architecture_never_gets_the_first_ones_version_0(two, tmp_path):
    a, b = two
    cache = ModelCache(tmp_path / "cache")
    first = cache.ensure(a.client("worker"), lineage_of(a), 0)
    second = cache.ensure(b.client("worker"), lineage_of(b), 0)
    assert lineage_of(a) != lineage_of(b) and first != second
    assert sha(first / "model.safetensors") == a.v0_files["model.safetensors"]
    assert sha(second / "model.safetensors") == b.v0_files["model.safetensors"] != a.v0_files["model.safetensors"]
    assert cache.ensure(a.client("worker"), lineage_of(a), 0) == first  # both stay cached, side by side


def test_the_same_base_model_under_two_coordinators_is_two_lineages(redis_server, redis_client, published, tmp_path):
    other_redis = redis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + "/2")
    other_redis.flushdb()
    a, b = start(redis_client, published, tmp_path / "a"), start(other_redis, published, tmp_path / "b")
    try:
        la, lb = lineage_of(a), lineage_of(b)
        assert la != lb  # a restarted operator's new data dir is a new lineage, even for the same weights
        assert la.split("-")[1] == lb.split("-")[1]  # ... though the id's second part names the same base
    finally:
        a.close()
        b.close()
        other_redis.close()


def test_a_cached_folder_whose_files_were_altered_is_built_again(rig_a, tmp_path):
    cache = ModelCache(tmp_path / "cache")
    client, name = rig_a.client("worker"), lineage_of(rig_a)
    folder = cache.ensure(client, name, 0)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert "differ from its stamp" in lineage.problem(folder, name, 0)
    assert cache.ensure(client, name, 0) == folder
    assert sha(weights) == rig_a.v0_files["model.safetensors"]
    # A folder stamped as another lineage's is not used either, whatever its path says.
    lineage.Stamp("0123456789abcdef-0123456789abcdef", 0, lineage.folder_files(folder)).write(folder)
    assert cache.usable(name, 0) is None and not folder.exists()


def test_catching_up_by_patches_stays_in_the_lineage(rig_a, tmp_path):
    cache = ModelCache(tmp_path / "cache")
    client, name = rig_a.client("worker"), lineage_of(rig_a)
    cache.ensure(client, name, 0)
    shapes = {m: s for m, s in rig_a.deps.shapes.items() if m.endswith(("q_proj", "v_proj"))}
    patch = lora.build_patch([fmt.from_bytes(make_adapter(shapes, seed=3))], [1.0])
    rig_a.ledger.versions.publish(VersionRecord(version=1, parent=0, patch=rig_a.store.put(fmt.to_bytes(patch))))
    folder = cache.ensure(client, name, 1)
    assert folder == cache.folder(name, 1) and lineage.problem(folder, name, 1) == ""
    got = RunningModel(folder).master(patch.modules())
    want = rig_a.deps.history.rebuild(1).master(patch.modules())
    assert all(torch.equal(got[m], want[m]) for m in want)


def test_a_pull_from_a_coordinator_of_another_lineage_is_refused(two, tmp_path):
    a, b = two
    with pytest.raises(NomoatError, match="now serves model lineage"):
        b.client("worker").pull(tmp_path / "out", 0, lineage=lineage_of(a))
    assert not (tmp_path / "out").exists()


def leased_upload(rig: Rig, name: str) -> tuple[pb.AdapterManifest, bytes]:
    """A task of a fresh job leased on ``rig`` and an adapter for it, as a task leaves it behind."""
    task_id = rig.ledger.tasks.ids(rig.submit().job_id)[0]
    fence = rig.lease(task_id)
    data = make_adapter(rig.deps.shapes, seed=1)
    return uploader.manifest_for(task_id, fence, 0, RANK, ALPHA, 300, 2.5, data, lineage=name,
                                 lease_secret=SECRET), data


def test_the_outbox_delivers_an_adapter_only_to_a_coordinator_of_its_lineage(two, tmp_path):
    a, b = two
    la, lb = lineage_of(a), lineage_of(b)
    outbox = uploader.Outbox(tmp_path / "outbox")
    for rig, name in ((a, la), (b, lb)):
        manifest, data = leased_upload(rig, name)
        outbox.give_up(outbox.put(manifest, data))  # its task stopped before the coordinator answered

    assert uploader.deliver_orphans(b.client("worker"), outbox, lb) == 1
    assert [e.manifest.lineage for e in outbox.orphans()] == [la]  # a's adapter waits for a
    assert uploader.deliver_orphans(a.client("worker"), outbox, la) == 1
    assert outbox.orphans() == []
    for rig in (a, b):
        assert [t.state for t in rig.ledger.tasks.of_job(rig.ledger.jobs.ids()[0])].count("done") == 1


def test_an_upload_of_another_lineage_is_refused(two):
    a, b = two
    manifest, data = leased_upload(b, lineage_of(a))
    reply = b.client("worker").upload(manifest, data)
    assert not reply.accepted and "lineage" in reply.reason


def test_the_lineage_is_fixed_once_for_version_0(ledger: Ledger, published, tmp_path):
    store = BlobStore(tmp_path / "blobs")
    ledger.versions.publish(VersionRecord(version=0, parent=-1, files=dict(published.files)))
    assert ledger.versions.lineage() is None  # a ledger from before lineages: the first to ask fixes one
    made = History(ledger, store, tmp_path).lineage()
    assert made.base_files == published.files and lineage.check_id(made.id) == made.id
    assert History(ledger, store, tmp_path).lineage() == made == ledger.versions.lineage()
    assert ledger.versions.fix_lineage(lineage.new_lineage(published.files)) == made  # the first writer wins


def test_a_malformed_lineage_never_names_a_cache_folder(tmp_path):
    cache = ModelCache(tmp_path / "cache")
    for bad in ("", "../../etc", "0123"):
        with pytest.raises(lineage.LineageError, match="not a lineage id"):
            cache.folder(bad, 0)
    assert not (tmp_path / "cache").exists()
