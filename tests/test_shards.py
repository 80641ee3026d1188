"""Sharded checkpoints (issue 11): a base saved by ``save_pretrained(max_shard_size=...)`` in
several bf16 safetensors files loads, folds, publishes (sharded, with its index) and is pulled
and caught up shard by shard, and every step keeps the exact fp32 arithmetic of a single file.
The model is a small Llama built from a LlamaConfig; the writer is nomoat/weights.py's."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from coordinator.ledger import VersionRecord
from coordinator.model.running import MASTER_FILE, RunningModel, materialize
from coordinator.model.store import BlobStore
from nomoat import adapter as fmt
from nomoat import lora, weights
from nomoat.tiny import tiny_model_path
from tests.rig import Published, Rig, start
from tests.test_bf16 import small_patches
from worker.cache import HashMemo, ModelCache, apply_patches


@pytest.fixture(scope="module")
def sharded_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sharded") / "model"
    config = LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, max_shard_size="400KB")
    AutoTokenizer.from_pretrained(tiny_model_path()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sharded_published(sharded_folder, tmp_path_factory) -> Published:
    model = RunningModel(sharded_folder)
    blobs = tmp_path_factory.mktemp("sharded-v0") / "blobs"
    files = model.publish(BlobStore(blobs))
    return Published(model, blobs, files, model.shapes(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"]))


@pytest.fixture
def sharded_rig(redis_client, sharded_published, tmp_path) -> Iterator[Rig]:
    r = start(redis_client, sharded_published, tmp_path)
    yield r
    r.close()


def _all_weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in weights.weight_files(folder):
        out.update(load_file(folder / name))
    return out


def test_the_writer_writes_what_safetensors_reads(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=gen), "b": torch.randn(7, generator=gen).to(torch.bfloat16),
               "c": torch.arange(6, dtype=torch.int64).view(2, 3), "d": torch.zeros(0, 4)}
    specs = [weights.TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    weights.write_file(tmp_path / "x.safetensors", specs, tensors.__getitem__)
    got = load_file(tmp_path / "x.safetensors")
    assert set(got) == set(tensors) and all(torch.equal(got[n], t) for n, t in tensors.items())
    assert weights.specs_of(tmp_path / "x.safetensors") == specs
    with weights.Reader(tmp_path / "x.safetensors") as reader:  # plain reads, no memory map
        assert reader.keys() == list(tensors) and all(torch.equal(reader.get_tensor(n), t) for n, t in tensors.items())
    with pytest.raises(ValueError, match="expected"):
        with weights.Writer(tmp_path / "y.safetensors", specs) as out:
            out.write(tensors["b"])  # out of order
    assert not (tmp_path / "y.safetensors").exists()  # a failed write leaves nothing behind


def test_a_sharded_base_loads_with_every_weight(sharded_folder: Path, sharded_published: Published) -> None:
    assert (sharded_folder / weights.INDEX).exists() and len(weights.weight_files(sharded_folder)) >= 3
    model = sharded_published.model
    state = model.model.state_dict()
    for name, tensor in _all_weights(sharded_folder).items():
        assert torch.equal(state[name], tensor.float()), name
    assert model.base_dtype == torch.bfloat16


def test_a_sharded_base_publishes_sharded_with_an_index_and_its_master(sharded_published: Published,
                                                                       tmp_path: Path) -> None:
    files = sharded_published.files
    shards = sorted(p for p in files if p.startswith("model-") and p.endswith(".safetensors"))
    assert len(shards) >= 3 and weights.INDEX in files and "model.safetensors" not in files
    assert MASTER_FILE in files
    folder = materialize(BlobStore(sharded_published.blobs), files, tmp_path / "v0")
    index = json.loads((folder / weights.INDEX).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    # Hugging Face loads it, in bf16, to the same weights
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.dtype == torch.bfloat16
    live = sharded_published.model.model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, live[name].to(torch.bfloat16)), name


def test_an_unsnapshotted_version_is_written_shard_by_shard_as_the_model_would_publish_it(
        sharded_rig: Rig, sharded_folder: Path, tmp_path: Path) -> None:
    model = RunningModel(sharded_folder)
    patches = small_patches(model.shapes(["q_proj", "v_proj", "down_proj"]), 2, 0.05)
    for version, patch in enumerate(patches, start=1):
        sharded_rig.ledger.versions.publish(
            VersionRecord(version=version, parent=version - 1, patch=sharded_rig.store.put(fmt.to_bytes(patch))))
        lora.apply_patch(model.master(patch.modules()), patch)
    made = materialize(sharded_rig.store, sharded_rig.deps.history.hf_files(2), tmp_path / "v2")
    live = materialize(sharded_rig.store, model.publish(sharded_rig.store), tmp_path / "live")
    assert weights.weight_files(made) == weights.weight_files(live)
    for name in weights.weight_files(made) + [MASTER_FILE]:
        assert (made / name).read_bytes() == (live / name).read_bytes(), f"{name} differs"
    # ... and the rebuilt master is the live one, bit for bit
    rebuilt = RunningModel(made)
    for m, w in model.master(list(patches[0].modules())).items():
        assert torch.equal(rebuilt.master([m])[m], w)


def test_a_sharded_version_is_pulled_and_caught_up_by_patch_shard_by_shard(
        sharded_rig: Rig, sharded_published: Published, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    client = sharded_rig.client("reader")
    lineage = sharded_rig.deps.history.lineage().id
    cache = ModelCache(tmp_path / "cache")
    v0 = cache.ensure(client, lineage, 0)
    assert (v0 / weights.INDEX).exists() and not (v0 / MASTER_FILE).exists()
    patch = small_patches(sharded_published.shapes, 1, 0.05)[0]
    sharded_rig.ledger.versions.publish(
        VersionRecord(version=1, parent=0, patch=sharded_rig.store.put(fmt.to_bytes(patch))))
    assert "pulled version 0" in capfd.readouterr().err  # the volunteer sees the pull (not a terminal: a summary)
    v1 = cache.ensure(client, lineage, 1)  # from v0 by the patch
    assert "pulled version 1" in capfd.readouterr().err  # ... and the catch-up
    want = materialize(sharded_rig.store, sharded_rig.deps.history.hf_files(1), tmp_path / "want")
    assert weights.weight_files(v1) == weights.weight_files(want)
    for name in weights.weight_files(v1):
        with safe_open(v1 / name, "pt") as got, safe_open(want / name, "pt") as expected:
            for key in expected.keys():
                assert torch.equal(got.get_tensor(key), expected.get_tensor(key)), key


def test_patching_a_folder_leaves_the_files_it_was_linked_from_alone(sharded_published: Published,
                                                                     tmp_path: Path) -> None:
    store = BlobStore(sharded_published.blobs)
    folder = materialize(store, sharded_published.files, tmp_path / "linked")
    before = {p: store.path(sha).read_bytes() for p, sha in sharded_published.files.items()}
    patch = small_patches(sharded_published.shapes, 1, 0.05)[0]
    fmt.save(patch, tmp_path / "p.safetensors")
    apply_patches(folder, [tmp_path / "p.safetensors"])
    assert any((folder / p).read_bytes() != b for p, b in before.items() if p.endswith(".safetensors"))
    assert all(store.path(sha).read_bytes() == before[p] for p, sha in sharded_published.files.items())


def test_the_cache_hashes_a_file_once_until_it_changes(tmp_path: Path, monkeypatch) -> None:
    from nomoat import lineage as lineages

    calls = []
    real = lineages.file_sha256
    monkeypatch.setattr(lineages, "file_sha256", lambda p: calls.append(p) or real(p))
    path = tmp_path / "w.safetensors"
    save_file({"x": torch.ones(4)}, path)
    memo = HashMemo(tmp_path / "hashes.json")
    first = memo(path)
    memo.save()
    assert HashMemo(tmp_path / "hashes.json")(path) == first and len(calls) == 1  # remembered across processes
    time.sleep(0.05)  # past the file system's timestamp granularity
    save_file({"x": torch.zeros(4)}, path)  # changed in place: same size and inode, a new mtime
    assert memo(path) != first and len(calls) == 2
