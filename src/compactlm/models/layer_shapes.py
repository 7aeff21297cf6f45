"""Models whose layers differ in shape (per-layer widths, pruning/per_layer.py): built, saved and loaded.

A Hugging Face class builds every layer alike from its config. A per-layer model is that class built at a
container shape (the widest MLP, a head count the class accepts) with each layer's weights then replaced by
tensors of its own shape, and each attention's query heads per KV group set to its layer's. Its config.json
holds the family's ordinary keys (the container) plus `LAYERS_KEY`, one {heads, kv_heads, ffn} record per layer,
and its safetensors hold each layer's own shapes.

`load` rebuilds such a checkpoint with no code from the checkpoint (no trust_remote_code): the class comes
from transformers, the shapes from the tensors, the head counts from `LAYERS_KEY`. Plain
`AutoModelForCausalLM.from_pretrained` refuses it (the shapes do not match the config's), never loads it wrong.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compactlm.errors import CompactLMError
from compactlm.models.family import Family, family_of

LAYERS_KEY = "compactlm_layers"  # config.json: [{"heads": .., "kv_heads": .., "ffn": ..}, ...], one per layer


def layer_records(config) -> list[dict] | None:
    """The per-layer records of a config (None: every layer has the config's shape)."""
    return getattr(config, LAYERS_KEY, None)


def check_uniform(config, spec: str, what: str) -> None:
    """One line when `spec` is a per-layer model and `what` (scoring, pruning) needs one width in every layer."""
    if layer_records(config):
        raise CompactLMError(f"{spec}: its layers differ in width (prune.per_layer); {what} needs one width in "
                             "every layer (such a model distils, evaluates and reloads, but is not cut again)")


def assign_shapes(model, family: Family, records: list[dict], state_dict: dict[str, torch.Tensor]) -> None:
    """Give each layer of `model` (built at the container shape, on the meta device) its own shapes: every
    weight whose shape differs from the tensor in `state_dict` becomes a meta parameter of the tensor's shape
    (which `load_state_dict(assign=True)` then fills), and each attention's query heads per KV group follow
    `records`."""
    if any(type(m).__name__ == "Conv1D" for m in model.modules()):
        raise CompactLMError(f"{family.name}: per-layer widths need nn.Linear projections")
    layers = model.get_submodule(family.layers_path)
    if len(records) != len(layers):
        raise CompactLMError(f"{LAYERS_KEY}: {len(records)} records for {len(layers)} layers")
    for key, tensor in state_dict.items():
        owner, _, name = key.rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            module = None
        if module is None or getattr(module, name, None) is None:  # no place for it in the family's class
            raise CompactLMError(f"per-layer checkpoint: unexpected tensor {key}")
        if getattr(module, name).shape != tensor.shape:
            setattr(module, name, nn.Parameter(torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")))
            if isinstance(module, nn.Linear):
                module.out_features, module.in_features = tensor.shape
    attention = family.attn_out_path.rpartition(".")[0]
    for layer, record in zip(layers, records):
        attn = layer.get_submodule(attention)
        if hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = record["heads"] // record["kv_heads"]


def load(path: str | Path, config, dtype: torch.dtype):
    """The per-layer model saved in folder `path` (its config already read), in `dtype`, on the CPU."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from compactlm.models.shards import source_shards

    records = layer_records(config)
    state_dict = {}
    for file in dict.fromkeys(source_shards(Path(path)).values()):
        state_dict |= {k: t.to(dtype) for k, t in load_file(file).items()}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    family = family_of(model)
    assign_shapes(model, family, records, state_dict)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = set(model.state_dict()) - set(state_dict)
    if tied:
        missing -= {k for k, _ in model.named_parameters(remove_duplicate=False) if k.startswith("lm_head")}
    if missing:
        raise CompactLMError(f"{path}: per-layer checkpoint lacks {min(missing)}")
    model.load_state_dict(state_dict, strict=False, assign=True)
    if tied:
        model.tie_weights()
    return model


def describe(config, dims) -> dict:
    """`dims` as a dict for reports; a per-layer model's heads, KV heads and MLP width as "min-max" ranges over
    its layers (the config's own values are only the container's)."""
    out = vars(dims).copy()
    for key in ("heads", "kv_heads", "ffn") if layer_records(config) else ():
        values = [r[key] for r in layer_records(config)]
        out[key] = f"{min(values)}-{max(values)}"
    return out
