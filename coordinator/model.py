"""The running model: fp32 master weights in memory, published versions as Hugging Face folders.

Only the folder thread touches a ``RunningModel``. Master weights stay in float32 whatever the
base model's dtype, because a small low-rank update added in bf16 is mostly rounded away;
published weights are cast back to the base dtype (and the folder's config says so, so a
version rebuilt from it publishes in that dtype again), and (when that dtype is not float32) the
exact fp32 master of the linear layers is stored beside them so a restart loses nothing. That
master is the coordinator's own: pulls never send it (:func:`pulled`).
"""

from __future__ import annotations

import copy
import tempfile
from contextlib import contextmanager
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from transformers import AutoModelForCausalLM, AutoTokenizer

from coordinator.store import BlobStore
from nomoat import lora, packing
from nomoat.adapter import Adapter

PRIVATE_PREFIX = "nomoat-"  # files of a stored version that only the coordinator reads
MASTER_FILE = PRIVATE_PREFIX + "master.safetensors"


def pulled(files: Mapping[str, str]) -> dict[str, str]:
    """The files of a stored version that a pull sends: all but the coordinator's own."""
    return {path: sha for path, sha in files.items() if not path.startswith(PRIVATE_PREFIX)}


class Checkpoint:
    def __init__(self, saved: dict[str, torch.Tensor]) -> None:
        self.saved = saved
        self.kept = False

    def keep(self) -> None:
        self.kept = True


class RunningModel:
    def __init__(self, folder: Path, device: str = "cpu") -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        config_dtype = getattr(_config(folder), "dtype", None) or torch.float32
        self.base_dtype = config_dtype if isinstance(config_dtype, torch.dtype) else getattr(torch, str(config_dtype))
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
        self.model.eval()
        self.device = device
        master = Path(folder) / MASTER_FILE
        if master.exists():
            self.load_master(st_load(master.read_bytes()))

    # -- weights ------------------------------------------------------------------------------

    def shapes(self, target_modules: Sequence[str]) -> dict[str, tuple[int, int]]:
        """Every nn.Linear whose last name is a target: module path -> (d_out, d_in)."""
        targets = set(target_modules)
        return {
            name: (m.out_features, m.in_features)
            for name, m in self.model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
        }

    def master(self, modules: Sequence[str]) -> dict[str, torch.Tensor]:
        """The live fp32 weights of ``modules`` (views: folding into them changes the model)."""
        table = dict(self.model.named_modules())
        return {name: table[name].weight.data for name in modules}

    def load_master(self, tensors: Mapping[str, torch.Tensor]) -> None:
        weights = self.master(list(tensors))
        for name, value in tensors.items():
            weights[name].copy_(value.to(torch.float32))

    @contextmanager
    def restorable(self, modules: Sequence[str]) -> Iterator[Checkpoint]:
        """Undo every change to ``modules`` on exit, unless ``checkpoint.keep()`` was called."""
        checkpoint = Checkpoint({name: w.clone() for name, w in self.master(modules).items()})
        try:
            yield checkpoint
        finally:
            if not checkpoint.kept:
                for name, w in self.master(modules).items():
                    w.copy_(checkpoint.saved[name])

    # -- evaluation ---------------------------------------------------------------------------

    def eval_loss(self, texts: Sequence[str], seq_len: int) -> float:
        blocks = packing.pack(self.tokenizer, texts, seq_len)
        return packing.mean_loss(self.model, blocks)

    def loss_with(self, adapter: Adapter, weight: float, texts: Sequence[str], seq_len: int) -> float:
        """Held-out loss of (current + weight·ΔW) without changing the model."""
        with self.restorable(adapter.modules()):
            lora.apply_patch(self.master(adapter.modules()), lora.build_patch([adapter], [weight]))
            return self.eval_loss(texts, seq_len)

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, store: BlobStore) -> dict[str, str]:
        """Write the current weights as a Hugging Face folder into the store: path -> sha256.

        Weights are cast to the base dtype; when that is not fp32, the fp32 master of every
        linear layer goes beside them, so the folder is an exact snapshot of the running model.
        """
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            state = {k: v.to(self.base_dtype) for k, v in self.model.state_dict().items()}
            self.model.save_pretrained(out, state_dict=state, safe_serialization=True)
            # save_pretrained writes the dtype of the live (fp32) parameters into config.json; the
            # folder holds base-dtype weights, and whoever loads it (a user, a worker, this class
            # rebuilding a later version) must see that dtype, or the next snapshot is fp32.
            config = copy.deepcopy(self.model.config)
            config.dtype = self.base_dtype
            config.save_pretrained(out)
            self.tokenizer.save_pretrained(out)
            if self.base_dtype != torch.float32:
                linear = [n for n, m in self.model.named_modules() if isinstance(m, torch.nn.Linear)]
                master = {k: v.contiguous() for k, v in self.master(linear).items()}
                (out / MASTER_FILE).write_bytes(st_save(master))
            return {
                str(p.relative_to(out)): store.put_file(p)
                for p in sorted(out.rglob("*"))
                if p.is_file()
            }


def _config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def materialize(store: BlobStore, files: Mapping[str, str], target: Path) -> Path:
    """Write a version's files from the store into ``target`` (created atomically)."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    for rel, sha in files.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(store.get(sha))
    tmp.rename(target)
    return target
