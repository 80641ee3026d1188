"""The running model's history: snapshots, patches, and rebuilding any version from them.

Versions are numbered 0 (the base model), 1, 2, … and each one's parent is the one before.
Every version stores its *patch*: the exact low-rank update from its parent (the concatenated,
weighted factors of what was folded, or the negated chain for a rollback). Every
``snapshot_every``-th version, version 0, and every rollback also store a *snapshot*: the whole
Hugging Face folder, plus the fp32 master of the linear layers when the base dtype is not fp32.
A version pulled as a folder is built once and kept, and then serves as a snapshot too. Any
version is its nearest snapshot at or below it plus the patches after that, applied in fp32 in
order — the same operations the folder performed, so the rebuild is exact.

Version numbers belong to a *lineage* (:mod:`nomoat.lineage`), fixed by version 0 and recorded in
the ledger: whoever holds a version outside the ledger names it by both.

Catching up from version ``have`` to ``want`` takes the cheaper (in bytes) of the patch chain
``have+1 … want`` and the nearest snapshot at or below ``want`` plus the patches after it.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

from coordinator.ledger import Ledger
from coordinator.model.running import RunningModel, materialize, pulled, write_patched
from coordinator.model.store import BlobStore
from nomoat import adapter as adapter_format
from nomoat import lora
from nomoat.lineage import Lineage, new_lineage

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class CatchUp:
    snapshot: int | None  # version whose full folder to fetch first, or None
    patches: list[int]  # versions whose patches to apply after it, in order
    bytes: int


def plan_catch_up(have: int | None, want: int, patch_bytes: dict[int, int],
                  snapshot_bytes: dict[int, int], full_bytes: int | None = None) -> CatchUp:
    """Pure: the cheapest way from ``have`` (None: nothing cached) to ``want``.

    The options: the patch chain from ``have``; the nearest snapshot at or below ``want`` plus
    the patches after it; and, when ``full_bytes`` is given, a snapshot of ``want`` itself (the
    coordinator builds one on demand), so catching up never costs more than the full weights.
    """
    options: list[CatchUp] = []
    if have is not None and have <= want:
        chain = list(range(have + 1, want + 1))
        options.append(CatchUp(None, chain, sum(patch_bytes[v] for v in chain)))
    base = max((v for v in snapshot_bytes if v <= want), default=None)
    if base is not None:
        chain = list(range(base + 1, want + 1))
        options.append(CatchUp(base, chain, snapshot_bytes[base] + sum(patch_bytes[v] for v in chain)))
    if full_bytes is not None and want not in snapshot_bytes:
        options.append(CatchUp(want, [], full_bytes))
    if not options:
        raise ValueError(f"version {want} has no snapshot at or below it")
    return min(options, key=lambda o: (o.bytes, o.snapshot is not None))


def peft_files(patch: adapter_format.Adapter) -> dict[str, bytes]:
    """A PEFT adapter folder for a patch: per-module ranks, alpha = rank so every scale is 1."""
    from safetensors.torch import save

    ranks = {m: int(a.shape[0]) for m, (a, _) in patch.factors.items()}
    top = max(ranks.values())
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": top,
        "lora_alpha": top,
        "target_modules": sorted(ranks),
        "rank_pattern": {m: r for m, r in ranks.items() if r != top},
        "alpha_pattern": {m: r for m, r in ranks.items() if r != top},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "base_model_name_or_path": None,
    }
    tensors = {}
    for module, (a, b) in patch.factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    return {PEFT_CONFIG: json.dumps(config, indent=2).encode(), PEFT_WEIGHTS: save(tensors)}


# The largest PEFT build History keeps for the next pull of the same update (one is kept).
PEFT_KEPT_BYTES = 64 << 20


class History:
    def __init__(self, ledger: Ledger, store: BlobStore, data_dir: Path, device: str = "cpu") -> None:
        self.ledger = ledger
        self.store = store
        self.dir = Path(data_dir) / "versions"
        self.device = device  # where a rebuilt model's weights live (the coordinator's --device)
        self._lock = threading.Lock()
        self._lineage: Lineage | None = None
        self._peft_lock = threading.Lock()
        self._peft_last: tuple[tuple[int, int], dict[str, bytes]] | None = None  # (since, until), its files

    def lineage(self) -> Lineage:
        """The lineage version 0 fixed; made (once, whoever asks first) for a ledger without one."""
        if self._lineage is None:
            found = self.ledger.versions.lineage()
            if found is None:
                base = self.ledger.versions.get(0)
                if base is None or not base.files:
                    raise ValueError("there is no version 0 yet, so no model lineage")
                found = self.ledger.versions.fix_lineage(new_lineage(base.files))
            self._lineage = found
        return self._lineage

    def patch(self, version: int) -> adapter_format.Adapter:
        return adapter_format.from_bytes(self.store.get(self.ledger.versions.get(version).patch))

    def snapshot_at_or_below(self, version: int) -> int:
        for v in range(version, -1, -1):
            record = self.ledger.versions.get(v)
            if record and record.files:
                return v
        raise ValueError(f"no snapshot at or below version {version}")

    def sizes(self, upto: int) -> tuple[dict[int, int], dict[int, int]]:
        """Bytes of each version's patch, and of each snapshot as a pull sends it (without the
        coordinator's fp32 master, which stays here), for versions up to ``upto``."""
        patches, snapshots = {}, {}
        for record in self.ledger.versions.all():
            v = record.version
            if v > upto:
                break
            if record.patch:
                patches[v] = self.store.size(record.patch)
            if record.files:
                snapshots[v] = sum(self.store.size(sha) for sha in pulled(record.files).values())
        return patches, snapshots

    def rebuild(self, version: int, into: RunningModel | None = None) -> RunningModel:
        """The model of ``version``, exactly: nearest snapshot plus the patches after it.

        ``into``: a model of the same lineage to overwrite in place (the running model, during a
        rollback), so that two models are never in memory at once."""
        base = self.snapshot_at_or_below(version)
        folder = materialize(self.store, self.ledger.versions.get(base).files, self.dir / str(base))
        if into is None:
            model = RunningModel(folder, self.device)
        else:
            model = into
            model.load(folder)
        for v in range(base + 1, version + 1):
            patch = self.patch(v)
            lora.apply_patch(model.master(patch.modules()), patch)
        return model

    def hf_files(self, version: int) -> dict[str, str]:
        """The version's Hugging Face folder in the store (path -> sha256), built once if needed:
        from its nearest snapshot and the patches after it, tensor by tensor (no model loaded)."""
        record = self.ledger.versions.get(version)
        if record is None:
            raise KeyError(version)
        if record.files:
            return record.files
        with self._lock:
            files = self.ledger.versions.get(version).files
            if not files:
                base = self.snapshot_at_or_below(version)
                base_files = self.ledger.versions.get(base).files
                folder = materialize(self.store, base_files, self.dir / str(base))
                patches = [self.patch(v) for v in range(base + 1, version + 1)]
                files = write_patched(self.store, folder, base_files, patches)
                self.ledger.versions.set_files(version, files)
        return files

    def peft(self, since: int, until: int) -> dict[str, bytes]:
        """The PEFT adapter of the update from ``since`` to ``until``, built from the stored patches.

        One build at a time, and the last one kept (versions never change): a reader asking for
        the same update again and again (``pull --since 0 --format peft`` in a loop, many at once)
        costs one build per new version, not one per pull."""
        if not 0 <= since < until:
            raise ValueError(f"a PEFT patch needs 0 <= since < version (got since {since}, version {until})")
        with self._peft_lock:
            if self._peft_last is not None and self._peft_last[0] == (since, until):
                return self._peft_last[1]
            files = peft_files(lora.chain([self.patch(v) for v in range(since + 1, until + 1)]))
            if sum(len(b) for b in files.values()) <= PEFT_KEPT_BYTES:
                self._peft_last = ((since, until), files)
            return files
