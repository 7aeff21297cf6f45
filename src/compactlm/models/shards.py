"""Safetensors checkpoints read without loading them: tensor by tensor, memory-mapped.

A tensor from `Shards.mapped` is a copy-on-write view of its file, so only the pages a computation touches
become resident (an embedding lookup reads its rows, not the table); `Shards.read` copies one tensor into
memory in the compute dtype. Layer-by-layer scoring (layerwise.py) and streamed surgery (pruning/stream.py)
both read checkpoints through here.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from compactlm.errors import CompactLMError, read_json

INDEX = "model.safetensors.index.json"
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def source_shards(checkpoint: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, in the checkpoint's order."""
    if (checkpoint / INDEX).is_file():
        weight_map = read_json(checkpoint / INDEX)["weight_map"]
        return {name: checkpoint / file for name, file in weight_map.items()}
    single = checkpoint / "model.safetensors"
    if not single.is_file():
        raise CompactLMError(f"{checkpoint} holds no model.safetensors or {INDEX}")
    return {name: single for name in _header(single)}


def _header(path: Path) -> dict:
    """The safetensors header of `path`: name -> {dtype, shape, data_offsets} (metadata dropped), checked: its
    length, a JSON object, known dtypes, every tensor's bytes matching its shape and lying inside the file. A
    truncated or garbage file is a one-line error here, not a crash or a read past the end of a mapping."""
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= size <= file_size - 8:
            raise CompactLMError(f"{path} is not a safetensors file (a header of {size} bytes in a file of "
                                 f"{file_size}): truncated or garbage")
        try:
            header = json.loads(f.read(size).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CompactLMError(f"{path}: its safetensors header is not JSON (truncated or garbage)") from None
    if not isinstance(header, dict):
        raise CompactLMError(f"{path}: its safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data = file_size - 8 - size
    for name, entry in header.items():
        _check_entry(path, name, entry, data)
    return {name: dict(entry, start=8 + size) for name, entry in header.items()}


def _check_entry(path: Path, name: str, entry, data_bytes: int) -> None:
    """One header entry: a known dtype, a shape of non-negative ints, offsets inside the data, bytes = shape."""
    try:
        dtype, shape, (begin, end) = _ST_DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
        ok = all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(begin, int) and isinstance(end, int)
    except (KeyError, TypeError, ValueError):
        raise CompactLMError(f"{path}: tensor '{name}' has a malformed header entry ({entry!r:.80})") from None
    if not ok or not 0 <= begin <= end <= data_bytes or end - begin != math.prod(shape) * dtype.itemsize:
        raise CompactLMError(f"{path}: tensor '{name}' {entry['dtype']} {shape} at bytes {begin}..{end} does not fit "
                             f"the file's {data_bytes} bytes of data (truncated or garbage)")


class Shards:
    """Tensors of a checkpoint read from memory-mapped safetensors files: only the pages used become resident."""

    def __init__(self, checkpoint: str | Path):
        self.checkpoint = Path(checkpoint)
        self.files = source_shards(self.checkpoint)
        self._headers: dict[Path, dict] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _entry(self, name: str) -> tuple[Path, dict]:
        """(file, header entry) of the tensor `name`; a one-line error when the checkpoint lacks it."""
        if name not in self.files:
            raise CompactLMError(f"{self.checkpoint}: no tensor '{name}' in the checkpoint (layer-by-layer loading "
                                 "reads checkpoints written by save_pretrained)")
        path = self.files[name]
        if path not in self._headers:
            self._headers[path] = _header(path)
        return path, self._headers[path][name]

    def mapped(self, name: str, rows: tuple[int, int] | None = None) -> Tensor:
        """The tensor `name` (only `rows` [start, end) of its first axis, when given) as a copy-on-write view of
        its file: no copy, pages read when touched, unmapped when the tensor is freed."""
        path, entry = self._entry(name)
        begin, end = entry["data_offsets"]
        dtype = _ST_DTYPES[entry["dtype"]]
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: writes never reach the file
        shape = list(entry["shape"])
        count = (end - begin) // dtype.itemsize
        if rows is not None:
            row = count // shape[0]
            begin, count, shape[0] = begin + rows[0] * row * dtype.itemsize, (rows[1] - rows[0]) * row, rows[1] - rows[0]
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype, count=count, offset=entry["start"] + begin).view(shape)

    def meta(self, name: str) -> Tensor:
        """An empty tensor on the meta device with the shape and dtype of `name` (reads only the header)."""
        entry = self._entry(name)[1]
        return torch.empty(entry["shape"], dtype=_ST_DTYPES[entry["dtype"]], device="meta")

    def read(self, name: str, dtype: torch.dtype) -> Tensor:
        """The tensor `name` in memory, in `dtype` (a fresh copy: its file pages are not kept)."""
        tensor = self.mapped(name)
        return tensor.to(dtype, copy=True)


def write_safetensors(path: str | Path, entries: list[tuple[str, torch.Size, torch.dtype]],
                      chunks: Iterator[Tensor]) -> None:
    """A safetensors file of `entries` (name, shape, dtype), whose bytes arrive in order from `chunks`: each
    tensor as one or more contiguous pieces. Nothing is gathered in memory (safetensors' own writer makes a
    bytes copy of every tensor); the sizes are checked against the header."""
    names = {v: k for k, v in _ST_DTYPES.items()}
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        size = dtype.itemsize * math.prod(shape)
        header[name] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    written = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for chunk in chunks:
            data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()  # a view: no copy
            f.write(data)
            written += data.nbytes
    if written != offset:
        raise CompactLMError(f"{path}: wrote {written} bytes of tensor data, the header promises {offset}")

