"""Model weights on disk, one tensor at a time: (sharded) safetensors folders, read and written
without ever holding a whole file, let alone a whole model, in memory.

A 1B-parameter model is 2 GB in bf16 and 4 GB as the coordinator's fp32 master; a second copy of
either in memory is what used to make the coordinator's peak twice its model. ``safetensors``'
own ``save``/``save_file`` build every tensor's bytes in memory before writing, so this module
writes the format itself (it is simple: an 8-byte little-endian header length, a JSON header
with each tensor's dtype, shape and byte range, then the raw bytes): :class:`Writer` takes the
tensors one by one, in the order its header lists them, and each goes to disk before the next is
made. :class:`Reader` reads one tensor at a time with plain reads (no memory map, whose touched
pages would count in the reader's resident set).

A Hugging Face folder holds its weights in ``model.safetensors``, or in shards named
``model-00001-of-00003.safetensors`` … with ``model.safetensors.index.json`` mapping every tensor
to its shard (what ``save_pretrained(max_shard_size=...)`` writes). :func:`weight_map` reads
either layout, :func:`write_model` writes the same layout back for any tensors.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Shards a published folder is cut into: small enough that a pull resumes at a fraction of the
# model and that readers never map one huge file, large enough that a 7B model has few files.
SHARD_BYTES = 1 << 30
PRIVATE_PREFIX = "nomoat-"  # files beside the weights that only nomoat reads (never model weights)

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    """What a header says about one tensor before its bytes exist."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class Writer:
    """A safetensors file written tensor by tensor, in the order of ``specs``.

    The header (every dtype, shape and byte range) is written on opening, so each tensor handed
    to :meth:`write` goes straight to disk; only it is ever in memory. Closing checks that every
    tensor came. Readable by ``safe_open`` / ``load_file`` / ``from_pretrained`` like any other.
    """

    def __init__(self, path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.specs = list(specs)
        header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for spec in self.specs:
            if spec.dtype not in _DTYPES:
                raise ValueError(f"{spec.name}: safetensors cannot hold {spec.dtype}")
            header[spec.name] = {"dtype": _DTYPES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._fh = open(self.path, "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, tensor: torch.Tensor) -> None:
        spec = self.specs[self._next]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{spec.name}: expected {spec.dtype} {spec.shape}, got {tensor.dtype} "
                             f"{tuple(tensor.shape)}")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        self._fh.write(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
        self._next += 1

    def close(self) -> None:
        self._fh.close()
        if self._next != len(self.specs):
            missing = [s.name for s in self.specs[self._next:]]
            self.path.unlink(missing_ok=True)
            raise ValueError(f"{self.path.name}: {len(missing)} tensor(s) were never written ({missing[0]}, …)")

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is not None:
            self._fh.close()
            self.path.unlink(missing_ok=True)
        else:
            self.close()


def write_file(path: Path, specs: Sequence[TensorSpec], produce: Callable[[str], torch.Tensor],
               metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file, asking ``produce`` for each tensor in turn."""
    with Writer(path, specs, metadata) as out:
        for spec in specs:
            out.write(produce(spec.name))


def plan_shards(specs: Sequence[TensorSpec], max_bytes: int = SHARD_BYTES) -> list[list[TensorSpec]]:
    """Consecutive groups of at most ``max_bytes`` (a bigger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards if shards[0] else []


def shard_names(n: int) -> list[str]:
    """Hugging Face's file names for ``n`` shards (``model.safetensors`` alone for one)."""
    return [SINGLE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_model(folder: Path, shards: Sequence[Sequence[TensorSpec]], produce: Callable[[str], torch.Tensor],
                tap: Callable[[str, torch.Tensor], None] | None = None) -> list[str]:
    """Write a model's weights into ``folder`` in Hugging Face's layout, one file per shard
    (:func:`plan_shards`, or a folder's own grouping); returns the file names.

    Each tensor is produced once (in any dtype: it is cast to its spec's), written, and dropped.
    ``tap`` sees every produced tensor before its cast, in order: the coordinator writes its fp32
    master in the same pass, so nothing is produced twice.
    """
    specs = [s for shard in shards for s in shard]
    names = shard_names(len(shards))
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards):
        with Writer(Path(folder) / name, shard) as out:
            for spec in shard:
                tensor = produce(spec.name)
                if tap is not None:
                    tap(spec.name, tensor)
                out.write(tensor.to(spec.dtype))
                weight_map[spec.name] = name
                del tensor
    if len(names) > 1:
        total = sum(s.nbytes for s in specs)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (Path(folder) / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        names.append(INDEX)
    return names


def weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> the file of ``folder`` that holds it, for one file or a sharded folder."""
    folder = Path(folder)
    index = folder / INDEX
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    files = [folder / SINGLE] if (folder / SINGLE).exists() else sorted(
        p for p in folder.glob("*.safetensors") if not p.name.startswith(PRIVATE_PREFIX))
    found: dict[str, str] = {}
    for path in files:
        found.update({spec.name: path.name for spec in specs_of(path)})
    if not found:
        raise FileNotFoundError(f"{folder} holds no safetensors weights")
    return found


def shards_of(folder: Path) -> list[list[TensorSpec]]:
    """``folder``'s own grouping of its tensors into files, in shard order."""
    return [specs_of(Path(folder) / name) for name in weight_files(folder)]


def largest_shard_bytes(folder: Path) -> int:
    """The bytes of ``folder``'s largest weights file: the shard size it was saved with."""
    return max(sum(s.nbytes for s in shard) for shard in shards_of(folder))


def weight_files(folder: Path) -> list[str]:
    """The files that hold ``folder``'s model weights, in shard order."""
    return sorted(set(weight_map(folder).values()))


def _header(fh) -> tuple[dict, int]:
    (length,) = struct.unpack("<Q", fh.read(8))
    header = json.loads(fh.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def specs_of(path: Path) -> list[TensorSpec]:
    """Every tensor's spec in one safetensors file, in the order its data is laid out."""
    with Path(path).open("rb") as fh:
        header, _ = _header(fh)
    by_name = {v: k for k, v in _DTYPES.items()}
    ordered = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return [TensorSpec(k, by_name[v["dtype"]], tuple(v["shape"])) for k, v in ordered]


class Reader:
    """One safetensors file read a tensor at a time with plain reads, not a memory map.

    ``safe_open`` maps the file, and every page of it a reader touches counts in the process's
    resident set until the kernel drops it: reading a 4 GB master through it puts 4 GB on the
    coordinator's peak RSS, beside the 4 GB it is being read into. Here only the tensor asked for
    is ever in memory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fh = open(self.path, "rb")
        self._header, self._start = _header(self._fh)
        self._dtypes = {v: k for k, v in _DTYPES.items()}

    def keys(self) -> list[str]:
        return sorted(self._header, key=lambda k: self._header[k]["data_offsets"][0])

    def __contains__(self, name: str) -> bool:
        return name in self._header

    def get_tensor(self, name: str) -> torch.Tensor:
        info = self._header[name]
        begin, end = info["data_offsets"]
        out = torch.empty(tuple(info["shape"]), dtype=self._dtypes[info["dtype"]])
        if end > begin:
            self._fh.seek(self._start + begin)
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            if self._fh.readinto(view) != end - begin:
                raise ValueError(f"{self.path.name}: {name} is cut short; the file is damaged")
        return out

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tensors(path: Path, names: Sequence[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of one safetensors file (or of ``names`` in it), one tensor read at a time."""
    with Reader(Path(path)) as fh:
        for name in names if names is not None else fh.keys():
            yield name, fh.get_tensor(name)
