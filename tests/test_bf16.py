"""A bf16 base model: published and pulled in bf16 (the fp32 master stays on the coordinator),
snapshot sizes as pulls send them, and a worker's patched copy equal to what the coordinator
publishes. The model is a small Llama built from a LlamaConfig and saved in bf16."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from coordinator.ledger import VersionRecord
from coordinator.model import modelcard
from coordinator.model.running import MASTER_FILE, RunningModel, materialize
from coordinator.model.store import BlobStore
from nomoat import adapter as fmt
from nomoat import lineage, lora
from nomoat.tiny import tiny_model_path
from tests.rig import Published, Rig, start
from worker.cache import apply_patches

TARGETS = ("q_proj", "v_proj", "down_proj")


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bf16") / "model"
    config = LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_path()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bf16_published(bf16_folder, tmp_path_factory) -> Published:
    model = RunningModel(bf16_folder)
    blobs = tmp_path_factory.mktemp("bf16-v0") / "blobs"
    files = model.publish(BlobStore(blobs))
    shapes = {name: (m.out_features, m.in_features) for name, m in model.model.named_modules()
              if isinstance(m, torch.nn.Linear)}
    return Published(model, blobs, files, shapes)


@pytest.fixture
def bf16_rig(redis_client, bf16_published, tmp_path) -> Iterator[Rig]:
    r = start(redis_client, bf16_published, tmp_path)
    yield r
    r.close()


def small_patches(shapes: dict[str, tuple[int, int]], count: int, scale: float) -> list[fmt.Adapter]:
    """Exact patches whose updates are far below bf16's resolution of these weights, one at a time."""
    gen = torch.Generator().manual_seed(1)
    targets = {m: s for m, s in shapes.items() if m.rsplit(".", 1)[-1] in TARGETS}
    patches = []
    for _ in range(count):
        factors = {m: (torch.randn(2, d_in, generator=gen) * scale, torch.randn(d_out, 2, generator=gen) * scale)
                   for m, (d_out, d_in) in targets.items()}
        patches.append(lora.build_patch([fmt.Adapter(factors, rank=2, alpha=2.0)], [1.0]))
    return patches


def dtypes(path: Path) -> set[str]:
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    return {info["dtype"] for key, info in header.items() if key != "__metadata__"}


def test_a_bf16_base_is_pulled_in_bf16_at_every_version(bf16_rig: Rig, bf16_published: Published) -> None:
    model = bf16_published.model
    fp32_bytes = 4 * sum(p.numel() for p in model.model.state_dict().values())
    # Version 1 has no snapshot: pulling it makes one on demand, from version 0's folder.
    patch = small_patches(bf16_published.shapes, 1, 0.05)[0]
    bf16_rig.ledger.versions.publish(
        VersionRecord(version=1, parent=0, patch=bf16_rig.store.put(fmt.to_bytes(patch))))
    for version in (0, 1):
        out = bf16_rig.tmp / f"pulled-{version}"
        assert bf16_rig.client("reader").pull(out, version=version) == version
        weights = out / "model.safetensors"
        assert dtypes(weights) == {"BF16"}, f"version {version} was published in {dtypes(weights)}"
        assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
        assert weights.stat().st_size < 0.55 * fp32_bytes  # about half of the fp32 bytes
        assert not (out / MASTER_FILE).exists()  # the fp32 master stays with the coordinator
    # ... and the coordinator's own copy of version 1 is exact: the fp32 master was kept beside it
    files = bf16_rig.deps.history.hf_files(1)
    assert MASTER_FILE in files
    master = st_load(bf16_rig.store.get(files[MASTER_FILE]))
    expected = model.master(patch.modules())
    for m, w in expected.items():
        torch.testing.assert_close(master[m], w + lora.patch_delta(patch, m), rtol=0, atol=1e-6)


def test_snapshot_sizes_count_what_a_pull_sends(bf16_rig: Rig) -> None:
    assert MASTER_FILE in bf16_rig.v0_files  # a bf16 base keeps an fp32 master beside its snapshot
    out = bf16_rig.tmp / "pulled"
    bf16_rig.client("reader").pull(out, version=0)
    # Version 0's model card is written at pull time (coordinator.model.modelcard), not kept in its snapshot.
    sent = sum(p.stat().st_size for p in out.rglob("*")
               if p.is_file() and p.name not in (lineage.STAMP, modelcard.README, modelcard.MANIFEST))
    assert (out / modelcard.README).is_file() and (out / modelcard.MANIFEST).is_file()
    _, snapshots = bf16_rig.deps.history.sizes(0)
    assert snapshots == {0: sent}


def test_a_bf16_worker_holds_exactly_what_the_coordinator_publishes(bf16_folder: Path, tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    coordinator = RunningModel(bf16_folder)
    worker = materialize(store, coordinator.publish(store), tmp_path / "worker-v0")
    patches = small_patches(coordinator.shapes(TARGETS), 6, 0.02)
    paths = []
    for i, patch in enumerate(patches):
        lora.apply_patch(coordinator.master(patch.modules()), patch)
        paths.append(tmp_path / f"{i:06d}.safetensors")
        fmt.save(patch, paths[-1])
    published = materialize(store, coordinator.publish(store), tmp_path / "coordinator-v6")

    apply_patches(worker, paths)

    modules = sorted(patches[0].modules())
    with safe_open(published / "model.safetensors", "pt") as want, safe_open(worker / "model.safetensors", "pt") as got:
        for m in modules:
            w = got.get_tensor(f"{m}.weight")
            assert w.dtype == torch.bfloat16
            assert torch.equal(w, want.get_tensor(f"{m}.weight")), f"{m} drifted from the coordinator's weights"
    # The patches are small enough that casting to bf16 after each one (instead of once) drifts:
    with safe_open(bf16_folder / "model.safetensors", "pt") as base, \
            safe_open(published / "model.safetensors", "pt") as want:
        drifted = 0
        for m in modules:
            w = base.get_tensor(f"{m}.weight")
            for patch in patches:
                w = (w.float() + lora.patch_delta(patch, m)).to(torch.bfloat16)
            drifted += int((w != want.get_tensor(f"{m}.weight")).sum())
        assert drifted > 0.1 * sum(patches[0].factors[m][1].shape[0] * patches[0].factors[m][0].shape[1]
                                   for m in modules)


def test_patched_touches_only_the_weights_it_is_given(bf16_folder: Path) -> None:
    coordinator = RunningModel(bf16_folder)
    patch = small_patches(coordinator.shapes(TARGETS), 1, 0.05)[0]
    some = sorted(patch.modules())[:2]
    weights = {m: coordinator.master([m])[m].to(torch.bfloat16) for m in some}  # one shard of a folder
    out = lora.patched(weights, [patch, patch])
    assert sorted(out) == some and all(w.dtype == torch.bfloat16 for w in out.values())
    for m in some:
        expected = (weights[m].float() + 2 * lora.patch_delta(patch, m)).to(torch.bfloat16)
        torch.testing.assert_close(out[m].float(), expected.float(), rtol=0.01, atol=1e-3)
    assert all(torch.equal(weights[m], coordinator.master([m])[m].to(torch.bfloat16)) for m in some)  # unchanged
