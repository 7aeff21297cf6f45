"""Surgery that streams: a safetensors checkpoint pruned tensor by tensor into sharded safetensors.

The model is never built: each tensor is read (memory-mapped) from its source shard, sliced by the same
`prune_tensor` as in-memory surgery, and appended to the output shard being filled; a shard is written once it
would pass `max_shard_bytes`. At most one source tensor, its pruned copy and one output shard are in memory. The output is an
ordinary Hugging Face checkpoint: config.json (from `prune_config`), model-0000i-of-0000n.safetensors and
model.safetensors.index.json, which `from_pretrained` loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from compactlm.models.family import family_of
from compactlm.models.shards import INDEX, Shards
from compactlm.pruning.plan import Plan
from compactlm.pruning.surgery import prune_config, prune_tensor


def prune_checkpoint(checkpoint: str | Path, plan: Plan, out: str | Path, *, max_shard_bytes: int = 2**30) -> Path:
    """Write `checkpoint` pruned to `plan` into the folder `out` (config + sharded weights + index)."""
    from transformers import AutoConfig

    checkpoint, out = Path(checkpoint), Path(out)
    config = AutoConfig.from_pretrained(checkpoint)
    family = family_of(config)
    dims = family.dims(config)
    plan.validate(dims)
    scaled = bool(family.layer_index_scale_flag and getattr(config, family.layer_index_scale_flag, False))
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, str]] = []  # per output shard: tensor name -> (temporary) file name
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            name = f".shard-{len(shards):05d}.safetensors"
            save_file(current, str(out / name), metadata={"format": "pt"})
            shards.append({key: name for key in current})
            current, size = {}, 0

    source = Shards(checkpoint)
    for name in source.files:
        tensor = source.mapped(name)
        if current and size + tensor.numel() * tensor.element_size() > max_shard_bytes:
            flush()  # the source size bounds the pruned size: the shard is written before it could overflow
        pruned = prune_tensor(family, dims, plan, name, tensor, scaled)
        del tensor  # unmaps the source pages
        if pruned is None:
            continue
        key, tensor = pruned
        nbytes = tensor.numel() * tensor.element_size()
        current[key], size, total = tensor.contiguous(), size + nbytes, total + nbytes
    flush()
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        (out / next(iter(shard.values()))).rename(out / final)
        weight_map |= {key: final for key in shard}
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    prune_config(config, family, plan).save_pretrained(out)
    return out
