"""Surgery that streams: a safetensors checkpoint pruned tensor by tensor into sharded safetensors.

The model is never built: the output's layout comes from the source headers alone (`prune_tensor` on meta
tensors); then each tensor is read (memory-mapped) from its source shard, sliced by the same `prune_tensor` as
in-memory surgery, and written straight into its output shard (at most `max_shard_bytes` each). Big tensors
whose rows are not pruned (embeddings, the LM head) go in row blocks of CHUNK_BYTES, so at most one source
tensor (or block) and its pruned copy are in memory, whatever the model's size. The output is an
ordinary Hugging Face checkpoint: config.json (from `prune_config`), model-0000i-of-0000n.safetensors and
model.safetensors.index.json, which `from_pretrained` loads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from compactlm.errors import CompactLMError
from compactlm.models.family import family_of
from compactlm.models.loading import remote_code
from compactlm.models.shards import INDEX, Shards, write_safetensors
from compactlm.pruning.plan import Plan
from compactlm.pruning.surgery import prune_config, prune_tensor, rescale_for, weight_axes

CHUNK_BYTES = 64 * 2**20  # a big tensor whose rows are not pruned (embeddings, LM head) is cut this many bytes at a time


def prune_checkpoint(checkpoint: str | Path, plan: Plan, out: str | Path, *, max_shard_bytes: int = 2**30) -> Path:
    """Write `checkpoint` pruned to `plan` into the folder `out` (config + sharded weights + index)."""
    from transformers import AutoConfig

    checkpoint, out = Path(checkpoint), Path(out)
    config = AutoConfig.from_pretrained(checkpoint, **remote_code())
    family = family_of(config)
    if family.moe:  # on disk each expert is its own tensors; the family record describes the fused ones
        raise CompactLMError(f"{checkpoint}: streamed surgery does not read mixture-of-experts checkpoints yet")
    dims = family.dims(config)
    plan.validate(dims)
    rescale = rescale_for(family, config, plan)
    cut = lambda name, tensor: prune_tensor(family, dims, plan, name, tensor, rescale)  # noqa: E731
    source = Shards(checkpoint)
    entries = []  # (source name, pruned name, shape, dtype): the output's layout, from the headers alone
    for name in source.files:
        pruned = cut(name, source.meta(name))
        if pruned is not None:
            entries.append((name, pruned[0], pruned[1].shape, pruned[1].dtype))
    groups = _shards(entries, max_shard_bytes)
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, group in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        pieces = (piece for name, *_ in group for piece in _pieces(source, name, family, cut))
        write_safetensors(out / file, [entry[1:] for entry in group], pieces)
        weight_map |= {entry[1]: file for entry in group}
    total = sum(_nbytes(entry) for entry in entries)
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    prune_config(config, family, plan).save_pretrained(out)
    return out


def _nbytes(entry: tuple) -> int:
    return math.prod(entry[2]) * entry[3].itemsize


def _shards(entries: list[tuple], max_bytes: int) -> list[list[tuple]]:
    """Consecutive entries grouped into shards of at most `max_bytes` (a bigger tensor gets a shard alone)."""
    groups: list[list[tuple]] = []
    size = 0
    for entry in entries:
        if not groups or size + _nbytes(entry) > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += _nbytes(entry)
    return groups


def _pieces(source: Shards, name: str, family, cut) -> Iterator[torch.Tensor]:
    """The pruned tensor `name` in pieces: row blocks of a big tensor whose first axis is not pruned (each
    block mapped, cut and unmapped in turn), else the whole tensor. Cutting is copying: the same bytes."""
    meta = source.meta(name)
    axes = weight_axes(family, name)[2]
    nbytes = meta.numel() * meta.element_size()
    if meta.ndim < 2 or axes[0] is not None or nbytes <= CHUNK_BYTES:
        yield cut(name, source.mapped(name))[1]
        return
    rows = meta.shape[0]
    step = max(1, rows * CHUNK_BYTES // nbytes)
    for start in range(0, rows, step):
        yield cut(name, source.mapped(name, (start, min(rows, start + step))))[1]
