"""The running model: fp32 master weights in memory, published versions as Hugging Face folders.

Only the folder thread touches a ``RunningModel``. Master weights stay in float32 whatever the
base model's dtype, because a small low-rank update added in bf16 is mostly rounded away;
published weights are cast back to the base dtype (and the folder's config says so, so a
version rebuilt from it publishes in that dtype again), and (when that dtype is not float32) the
exact fp32 master of the linear layers is stored beside them so a restart loses nothing. That
master is the coordinator's own: pulls never send it (:func:`pulled`).

Memory (issue 11): for P parameters the coordinator holds the 4P bytes of the master and never a
second full copy. Loading reads one shard (and the master one tensor) at a time; gates evaluate a
candidate as a side path (:func:`nomoat.evaluation.plus`) instead of changing or copying
weights; publishing writes shard by shard, each tensor cast to the base dtype on its way to disk
(:mod:`nomoat.weights`), and moves the files into the store by rename; a version that was never
snapshotted is written from its nearest snapshot plus its patches, tensor by tensor
(:func:`write_patched`), without loading a second model.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from coordinator.model.store import BlobStore
from nomoat import evaluation, lora, packing, weights
from nomoat.adapter import Adapter

PRIVATE_PREFIX = weights.PRIVATE_PREFIX  # files of a stored version that only the coordinator reads
MASTER_FILE = PRIVATE_PREFIX + "master.safetensors"
_WEIGHT = ".weight"


def pulled(files: Mapping[str, str]) -> dict[str, str]:
    """The files of a stored version that a pull sends: all but the coordinator's own."""
    return {path: sha for path, sha in files.items() if not path.startswith(PRIVATE_PREFIX)}


def resolve_device(device: str) -> str:
    """``cpu``, ``cuda`` (``cuda:N``), or ``auto`` (cuda when torch sees one); a sentence when the
    device asked for is not there."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine's torch sees no CUDA device; "
                         "use --device cpu (or auto)")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device {device}: choose cpu, cuda (cuda:N) or auto")
    return device


class Checkpoint:
    def __init__(self, saved: dict[str, torch.Tensor]) -> None:
        self.saved = saved
        self.kept = False

    def keep(self) -> None:
        self.kept = True


class RunningModel:
    def __init__(self, folder: Path, device: str = "cpu") -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.base_dtype = _dtype_of(AutoConfig.from_pretrained(folder))
        # Straight onto the device, shard by shard (no CPU copy of a model bound for a GPU).
        placement = {} if device == "cpu" else {"device_map": {"": device}}
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **placement)
        self.model.eval()
        self.model.requires_grad_(False)  # never trained here; gradients would only cost memory
        self.device = device
        self._load_master(Path(folder))
        # Published versions are cut into shards like the base's (a sharded base keeps its shard
        # size; one file is cut at weights.SHARD_BYTES).
        files = weights.weight_files(folder)
        self.shard_bytes = weights.largest_shard_bytes(folder) if len(files) > 1 else weights.SHARD_BYTES

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
        weights_ = self.master(list(tensors))
        for name, value in tensors.items():
            weights_[name].copy_(value.to(torch.float32))

    def _load_master(self, folder: Path) -> None:
        master = folder / MASTER_FILE
        if master.exists():
            with weights.Reader(master) as fh:  # one tensor at a time
                for name in fh.keys():
                    self.load_master({name: fh.get_tensor(name)})

    def load(self, folder: Path) -> None:
        """Make this model the one in ``folder`` (same architecture), in place, shard by shard:
        a rebuild that never holds two models."""
        params = self.model.state_dict(keep_vars=True)
        by_file: dict[str, list[str]] = {}
        for name, file in weights.weight_map(folder).items():
            by_file.setdefault(file, []).append(name)
        missing = sorted(n for names in by_file.values() for n in names if n not in params)
        if missing:
            raise ValueError(f"{folder} holds weights this model lacks (e.g. {', '.join(missing[:3])})")
        with torch.no_grad():
            for file, names in sorted(by_file.items()):
                for name, tensor in weights.tensors(Path(folder) / file, names):
                    params[name].data.copy_(tensor)
            self._load_master(Path(folder))

    def _named_tensors(self) -> dict[str, torch.Tensor]:
        """The state dict without tied duplicates (the first name of each storage, as
        ``save_pretrained`` keeps it)."""
        seen: set[int] = set()
        out = {}
        for name, tensor in self.model.state_dict().items():
            key = tensor.untyped_storage().data_ptr()
            if key in seen:
                continue
            seen.add(key)
            out[name] = tensor
        return out

    def _linear_weights(self, names: set[str]) -> dict[str, str]:
        """Weight name -> module name, for every nn.Linear whose weight is among ``names``."""
        return {n + _WEIGHT: n for n, m in self.model.named_modules()
                if isinstance(m, torch.nn.Linear) and n + _WEIGHT in names}

    @contextmanager
    def restorable(self, modules: Sequence[str]) -> Iterator[Checkpoint]:
        """Undo every change to ``modules`` on exit, unless ``checkpoint.keep()`` was called.

        It copies ``modules``' weights: for benchmarks on small models. The folder evaluates
        candidates with :meth:`losses` ``(…, patch)`` instead, which copies nothing."""
        checkpoint = Checkpoint({name: w.clone() for name, w in self.master(modules).items()})
        try:
            yield checkpoint
        finally:
            if not checkpoint.kept:
                for name, w in self.master(modules).items():
                    w.copy_(checkpoint.saved[name])

    # -- evaluation ---------------------------------------------------------------------------

    def eval_set(self, texts: Sequence[str], seq_len: int, budget: int = 0) -> evaluation.EvalSet:
        return evaluation.eval_set(self.tokenizer, texts, seq_len, budget)

    def losses(self, evals: evaluation.EvalSet, patch: Adapter | None = None, dtype: str = "fp32"
               ) -> evaluation.Losses:
        """Per-block losses of the current model, or of the current model plus ``patch`` (as a
        side path: the weights are not changed); ``dtype``: see evaluation.block_losses."""
        return evaluation.losses_with(self.model, evals, patch, dtype)

    def eval_loss(self, texts: Sequence[str], seq_len: int) -> float:
        blocks = packing.pack(self.tokenizer, texts, seq_len)
        return packing.mean_loss(self.model, blocks)

    def loss_with(self, adapter: Adapter, weight: float, texts: Sequence[str], seq_len: int) -> float:
        """Held-out loss of (current + weight·ΔW) without changing (or copying) the model."""
        return self.losses(self.eval_set(texts, seq_len), lora.build_patch([adapter], [weight])).mean

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, store: BlobStore, max_shard_bytes: int | None = None) -> dict[str, str]:
        """Write the current weights as a Hugging Face folder into the store: path -> sha256.

        Weights are cast to the base dtype one tensor at a time on their way to disk, in shards
        of ``max_shard_bytes`` (default: the base's shard size); when that dtype is not fp32,
        the fp32 master of every linear layer goes beside them (written in the same pass), so
        the folder is an exact snapshot.
        """
        tensors = self._named_tensors()
        specs = [weights.TensorSpec(n, self.base_dtype if t.is_floating_point() else t.dtype, tuple(t.shape))
                 for n, t in tensors.items()]
        masters = self._linear_weights(set(tensors)) if self.base_dtype != torch.float32 else {}
        with store.staging() as out:
            shards = weights.plan_shards(specs, max_shard_bytes or self.shard_bytes)
            _write_weights(out, shards, tensors.__getitem__, masters)
            # The config says the base dtype: whoever loads the folder (a user, a worker, this
            # class rebuilding a later version) must see it, or the next snapshot is fp32.
            config = copy.deepcopy(self.model.config)
            config.dtype = self.base_dtype
            config.save_pretrained(out)
            if getattr(self.model, "generation_config", None) is not None and self.model.can_generate():
                self.model.generation_config.save_pretrained(out)
            self.tokenizer.save_pretrained(out)
            return store.adopt_folder(out)


def _write_weights(out: Path, shards: list[list[weights.TensorSpec]], produce: Callable[[str], torch.Tensor],
                   masters: dict[str, str]) -> None:
    """The weight shards, and the fp32 master of ``masters`` (weight name -> module) beside
    them in the same pass when there are any."""
    if not masters:
        weights.write_model(out, shards, produce)
        return
    specs = [s for shard in shards for s in shard]
    master_specs = [weights.TensorSpec(masters[s.name], torch.float32, s.shape) for s in specs if s.name in masters]
    with weights.Writer(out / MASTER_FILE, master_specs) as master:
        def tap(name: str, tensor: torch.Tensor) -> None:
            if name in masters:
                master.write(tensor.to(torch.float32))

        weights.write_model(out, shards, produce, tap=tap)


def write_patched(store: BlobStore, folder: Path, files: Mapping[str, str], patches: Sequence[Adapter]
                  ) -> dict[str, str]:
    """The snapshot of (the version in ``folder``) + ``patches``, written into the store tensor by
    tensor in ``folder``'s shard layout: path -> sha256. ``files`` is ``folder``'s own
    path -> sha256 (its other files, config and tokenizer, are shared with it).

    The same arithmetic as rebuilding the model and publishing it (each patched weight taken in
    fp32 from the master, or the fp32 weights, and every patch added in order by
    :func:`nomoat.lora.patched`, then cast once), without ever holding more than one tensor.
    """
    folder = Path(folder)
    layout = weights.weight_map(folder)
    shard_files = sorted(set(layout.values()))
    patched_modules = {m for p in patches for m in p.factors}
    with ExitStack() as stack, store.staging() as out:
        handles = {f: stack.enter_context(weights.Reader(folder / f)) for f in shard_files}
        master = stack.enter_context(weights.Reader(folder / MASTER_FILE)) \
            if (folder / MASTER_FILE).exists() else None
        master_names = set(master.keys()) if master is not None else set()
        shards = [weights.specs_of(folder / f) for f in shard_files]
        specs = [s for shard in shards for s in shard]

        def produce(name: str) -> torch.Tensor:
            module = name[: -len(_WEIGHT)] if name.endswith(_WEIGHT) else ""
            if module in master_names:
                value = master.get_tensor(module)
            else:
                value = handles[layout[name]].get_tensor(name)
            if module in patched_modules:
                value = lora.patched({module: value.to(torch.float32)}, patches)[module]
            return value

        masters = {s.name: s.name[: -len(_WEIGHT)] for s in specs
                   if s.name.endswith(_WEIGHT) and s.name[: -len(_WEIGHT)] in master_names}
        _write_weights(out, shards, produce, masters)
        made = store.adopt_folder(out)
    weight_like = set(shard_files) | {weights.INDEX, MASTER_FILE}
    kept = {p: sha for p, sha in files.items() if p not in weight_like}
    return {**kept, **made}


def _dtype_of(config) -> torch.dtype:
    found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return found if isinstance(found, torch.dtype) else getattr(torch, str(found))


def materialize(store: BlobStore, files: Mapping[str, str], target: Path) -> Path:
    """Write a version's files from the store into ``target`` (created atomically).

    Files are hard links to the (immutable) blobs where the store is a folder on this file
    system, else streamed copies (downloads from an object store): never read into memory."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    for rel, sha in files.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        store.fetch(sha, path)
    tmp.rename(target)
    return target
