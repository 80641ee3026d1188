"""The carry of a warm-started job: what a worker keeps on disk to continue the job on the next version.

A job submitted with ``--warm-start`` trains each task from the factors the same worker's
previous task of that job ended with, and with its AdamW moments (``worker.trainer.Carry``). They
stay on the worker (only the exact difference is uploaded), one pair of files per (model
lineage, job) in ``<cache>/carry/``: the factors as a nomoat adapter file, the moments as plain
safetensors (never a pickle). A carry that cannot be read is dropped and the task starts fresh:
a fresh start is always correct, only the continuation is lost.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from nomoat import adapter as adapter_format
from worker.trainer import Carry

log = logging.getLogger("nomoat.carry")

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
_SEP = "::"  # "<parameter name>::<moment name>" in the moments file


class CarryStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, lineage: str, job_id: str, suffix: str) -> Path:
        return self.root / (_SAFE.sub("_", lineage or "-")[:64] + "." + _SAFE.sub("_", job_id)[:128] + suffix)

    def load(self, lineage: str, job_id: str) -> Carry | None:
        """The carry the last task of ``job_id`` on this worker left, or None (none, or damaged)."""
        factors_path, moments_path = self._path(lineage, job_id, ".adapter"), self._path(lineage, job_id, ".moments")
        if not factors_path.exists():
            return None
        try:
            factors = adapter_format.from_bytes(factors_path.read_bytes())
            flat = st_load(moments_path.read_bytes())
        except (OSError, adapter_format.AdapterFormatError, RuntimeError, ValueError) as exc:
            log.warning("the carry of job %s could not be read (%s); this task starts fresh", job_id, exc)
            self.drop(lineage, job_id)
            return None
        moments: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in flat.items():
            name, _, moment = key.rpartition(_SEP)
            moments.setdefault(name, {})[moment] = tensor
        return Carry(factors, moments)

    def save(self, lineage: str, job_id: str, carry: Carry) -> None:
        """Keep ``carry`` for the job's next task here (each file written whole, then renamed)."""
        self.root.mkdir(parents=True, exist_ok=True)
        flat = {f"{name}{_SEP}{moment}": t.detach().cpu().contiguous()
                for name, state in carry.optimizer_state.items() for moment, t in state.items()}
        for suffix, data in ((".moments", st_save(flat)), (".adapter", adapter_format.to_bytes(carry.factors))):
            path = self._path(lineage, job_id, suffix)
            tmp = self._path(lineage, job_id, suffix + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)

    def drop(self, lineage: str, job_id: str) -> None:
        for suffix in (".adapter", ".moments"):
            self._path(lineage, job_id, suffix).unlink(missing_ok=True)
