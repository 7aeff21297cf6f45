"""Safetensors checkpoints read without loading them: tensor by tensor, memory-mapped.

A tensor from `Shards.mapped` is a copy-on-write view of its file, so only the pages a computation touches
become resident (an embedding lookup reads its rows, not the table); `Shards.read` copies one tensor into
memory in the compute dtype. Layer-by-layer scoring (layerwise.py) and streamed surgery (pruning/stream.py)
both read checkpoints through here.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch
from torch import Tensor

from compactlm.errors import CompactLMError

INDEX = "model.safetensors.index.json"
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def source_shards(checkpoint: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, in the checkpoint's order."""
    if (checkpoint / INDEX).is_file():
        weight_map = json.loads((checkpoint / INDEX).read_text())["weight_map"]
        return {name: checkpoint / file for name, file in weight_map.items()}
    single = checkpoint / "model.safetensors"
    if not single.is_file():
        raise CompactLMError(f"{checkpoint} holds no model.safetensors or {INDEX}")
    return {name: single for name in _header(single)}


def _header(path: Path) -> dict:
    """The safetensors header of `path`: name -> {dtype, shape, data_offsets} (metadata dropped)."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return {name: dict(entry, start=8 + size) for name, entry in header.items()}


class Shards:
    """Tensors of a checkpoint read from memory-mapped safetensors files: only the pages used become resident."""

    def __init__(self, checkpoint: str | Path):
        self.checkpoint = Path(checkpoint)
        self.files = source_shards(self.checkpoint)
        self._headers: dict[Path, dict] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def mapped(self, name: str) -> Tensor:
        """The tensor `name` as a copy-on-write view of its file: no copy, pages read when touched."""
        if name not in self.files:
            raise CompactLMError(f"{self.checkpoint}: no tensor '{name}' in the checkpoint (layer-by-layer loading "
                                 "reads checkpoints written by save_pretrained)")
        path = self.files[name]
        if path not in self._headers:
            self._headers[path] = _header(path)
        entry = self._headers[path][name]
        begin, end = entry["data_offsets"]
        dtype = _ST_DTYPES[entry["dtype"]]
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: writes never reach the file
        count = (end - begin) // dtype.itemsize
        if count == 0:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype, count=count, offset=entry["start"] + begin).view(entry["shape"])

    def read(self, name: str, dtype: torch.dtype) -> Tensor:
        """The tensor `name` in memory, in `dtype` (a fresh copy: its file pages are not kept)."""
        tensor = self.mapped(name)
        return tensor.to(dtype, copy=True)

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of every tensor of the checkpoint (in `dtype` when given)."""
        total = 0
        for path in set(self.files.values()):
            for entry in _header(path).values():
                n = 1
                for s in entry["shape"]:
                    n *= s
                total += n * (dtype.itemsize if dtype is not None else _ST_DTYPES[entry["dtype"]].itemsize)
        return total


def model_bytes(checkpoint: str | Path, dtype: torch.dtype) -> int:
    """Bytes the checkpoint's weights take in memory in `dtype`."""
    return Shards(checkpoint).nbytes(dtype)
