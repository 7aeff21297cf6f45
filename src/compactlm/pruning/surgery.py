"""Pure surgery: (config, state_dict, plan) -> (new config, new state_dict), and a model built from them.

Every weight's axes are labelled in its family record (models/family.py); slicing a weight means indexing
each labelled axis with the plan's keep indices for that label. Nothing is patched in place: the pruned
model is built from its new config with its parameters on the meta device, and the sliced weights are
assigned to it with strict=True, which is the shape check.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, replace

import torch

from compactlm.errors import CompactLMError
from compactlm.models.family import Dims, Family, family_of
from compactlm.models.layer_shapes import LAYERS_KEY, assign_shapes, layer_records
from compactlm.models.params import PER_EXPERT
from compactlm.pruning.plan import Plan


def head_channels(keep_heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Channel indices of the kept heads: (k,) head ids -> (k * head_dim,) sorted channel ids."""
    offsets = torch.arange(head_dim)
    return (keep_heads[:, None] * head_dim + offsets[None, :]).reshape(-1)  # (k, head_dim) -> (k*head_dim,)


def axis_index(label: str, plan: Plan, layer: int | None, dims: Dims) -> torch.Tensor:
    if label == "hidden":
        return plan.hidden
    if label == "ffn":
        return plan.ffn[layer]
    if label == "ffn2":  # fused [gate | up]
        return torch.cat([plan.ffn[layer], dims.ffn + plan.ffn[layer]])
    if label == "expert":
        return plan.experts[layer]
    if label == "effn":  # (experts', ffn'): one row per kept expert, see `_slice`
        return plan.ffn[layer]
    if label == "effn2":  # fused [gate | up] of each kept expert
        return torch.cat([plan.ffn[layer], dims.ffn + plan.ffn[layer]], dim=1)
    q = head_channels(plan.heads[layer], dims.head_dim)
    kv = head_channels(plan.kv_heads[layer], dims.head_dim)
    if label == "q":
        return q
    if label == "kv":
        return kv
    if label == "qkv":  # fused [q | k | v]
        q_width, kv_width = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
        return torch.cat([q, q_width + kv, q_width + kv_width + kv])
    raise ValueError(f"unknown axis label {label!r}")




def _slice(tensor: torch.Tensor, axes: tuple, plan: Plan, layer: int | None, dims: Dims) -> torch.Tensor:
    if len(axes) != tensor.ndim:
        raise ValueError(f"axes {axes} do not match a tensor of shape {tuple(tensor.shape)}")
    for dim, label in enumerate(axes):
        if label is not None and label not in PER_EXPERT:
            tensor = tensor.index_select(dim, axis_index(label, plan, layer, dims).to(tensor.device))
    for dim, label in enumerate(axes):
        if label in PER_EXPERT:  # the experts (dim 0) are already the kept ones: expert j keeps its row j
            rows = axis_index(label, plan, layer, dims).to(tensor.device)  # (experts', n')
            tensor = torch.stack([t.index_select(dim - 1, keep) for t, keep in zip(tensor, rows)])
    return tensor.contiguous()


def rescale_queries(tensor: torch.Tensor, axes: tuple, factor: float, q_width: int) -> torch.Tensor:
    """Multiply the query part of a fused [q | k | v] axis by `factor` (other tensors unchanged)."""
    if factor == 1.0 or "qkv" not in axes:
        return tensor
    dim = axes.index("qkv")
    out = tensor.clone()
    out.narrow(dim, 0, q_width).mul_(factor)
    return out


@dataclass(frozen=True)
class Rescale:
    """Value changes, beyond slicing, that keep a pruned model computing what its source computed.

    `layer_index`: attention scores are divided by (layer_idx + 1) (GPT-2's scale_attn_by_inverse_layer_idx);
    a layer moved from index i to j gets its queries scaled by (j+1)/(i+1), so that its attention is unchanged.
    `embedding`: Gemma multiplies the embedding by sqrt(hidden_size) in forward; with hidden pruned from H to H'
    the kept channels are multiplied by sqrt(H / H'), so the residual stream enters the layers unchanged.
    `head`, `final_norm`: with that embedding tied to the LM head (one tensor, so the head is multiplied too),
    the logits would grow by the same factor; the final norm's gain (offset + w) is divided by it, so the logits
    are unchanged too."""

    layer_index: bool = False
    embedding: float = 1.0
    head: float = 1.0
    final_norm: float = 1.0


def rescale_for(family: Family, config, plan: Plan) -> Rescale:
    """The `Rescale` that pruning `config` to `plan` needs."""
    layer_index = bool(family.layer_index_scale_flag and getattr(config, family.layer_index_scale_flag, False))
    dims = family.dims(config)
    if not family.scaled_embedding or len(plan.hidden) == dims.hidden:
        return Rescale(layer_index)
    factor = math.sqrt(dims.hidden / len(plan.hidden))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return Rescale(layer_index, factor, factor, 1.0 / factor) if tied else Rescale(layer_index, factor)


def _rescale(family: Family, key: str, tensor: torch.Tensor, rescale: Rescale) -> torch.Tensor:
    """The embedding or final norm of a pruned model multiplied as `rescale` says (other weights unchanged)."""
    factor = {family.embed_path + ".weight": rescale.embedding, family.lm_head_path + ".weight": rescale.head}.get(key)
    if factor is not None and factor != 1.0:
        return (tensor.float() * factor).to(tensor.dtype)
    if key == family.final_norm_path + ".weight" and rescale.final_norm != 1.0:  # gain = offset + w
        offset = family.norm_offset
        return ((tensor.float() + offset) * rescale.final_norm - offset).to(tensor.dtype)
    return tensor


def weight_axes(family: Family, key: str) -> tuple[int | None, str, tuple]:
    """(layer index or None, name within the layer, axis labels) of the weight `key`; a one-line error when the
    family record does not describe it."""
    match = re.match(rf"^{re.escape(family.layers_path)}\.(\d+)\.(.+)$", key)
    layer, suffix = (int(match.group(1)), match.group(2)) if match else (None, key)
    axes = family.layer_params.get(suffix) if match else family.global_params.get(key)
    if axes is None:
        raise CompactLMError(f"{family.name}: weight '{key}' is not described in the family record; cannot prune it")
    return layer, suffix, axes


def prune_tensor(family: Family, dims: Dims, plan: Plan, key: str, tensor: torch.Tensor,
                 rescale: Rescale = Rescale()) -> tuple[str, torch.Tensor] | None:
    """One weight sliced to the plan and rescaled as `rescale` says (`rescale_for`), under its new name (kept
    layers renumbered 0..n-1); None when its layer is dropped."""
    layer, suffix, axes = weight_axes(family, key)
    new_key = key
    if layer is not None:
        kept = plan.layers.tolist()
        if layer not in kept:
            return None
        new_key = f"{family.layers_path}.{kept.index(layer)}.{suffix}"
    out = _slice(tensor, axes, plan, layer, dims)
    if rescale.layer_index and layer is not None:
        out = rescale_queries(out, axes, (kept.index(layer) + 1) / (layer + 1), plan.dims(dims).heads * dims.head_dim)
    return new_key, _rescale(family, key, out, rescale)


def prune_state_dict(
    family: Family, dims: Dims, state_dict: dict[str, torch.Tensor], plan: Plan, rescale: Rescale = Rescale()
) -> dict[str, torch.Tensor]:
    """Every weight of `state_dict` through `prune_tensor`."""
    pruned = (prune_tensor(family, dims, plan, k, t, rescale) for k, t in state_dict.items())
    return dict(item for item in pruned if item is not None)


def prune_config(config, family: Family, plan: Plan):
    """A new config of the same class describing the pruned shape (head_dim explicit where the family has it).
    A per-layer plan's config is a container: the widest MLP and a head count its class accepts (the model it
    builds is then re-shaped layer by layer, models/layer_shapes.py)."""
    dims = family.dims(config)
    new_dims = plan.dims(dims)
    if plan.per_layer:
        new_dims = _container(family, replace(new_dims, ffn=max(d.ffn for d in plan.layer_dims(dims))))
    family.check(new_dims)
    new = copy.deepcopy(config)
    for key, value in family.config_updates(new_dims).items():
        setattr(new, key, value)
    if plan.per_layer:  # each layer's own shape, read back by models/layer_shapes.py
        setattr(new, LAYERS_KEY, [{"heads": d.heads, "kv_heads": d.kv_heads, "ffn": d.ffn}
                                  for d in plan.layer_dims(dims)])
    kept = plan.layers.tolist()
    for key in family.per_layer_keys:  # per-layer lists (attention kinds, RoPE flags) follow their layers
        if isinstance(getattr(new, key, None), list):
            setattr(new, key, [getattr(config, key)[i] for i in kept])
    return new


def _container(family: Family, dims: Dims) -> Dims:
    """`dims` with the most query heads (in one KV group) up to its own that the family's config class accepts
    (Llama's rejects a hidden size that the head count does not divide, e.g. 384 and 9)."""
    for heads in [*range(dims.heads, 0, -1), dims.hidden // dims.head_dim]:
        candidate = replace(dims, heads=heads, kv_heads=1)
        try:
            family.check(candidate)
            return candidate
        except CompactLMError:
            continue
    family.check(dims)  # raises the error that names the constraint
    return dims


def prune_model(model, plan: Plan):
    """Build a new model of the pruned shape around the sliced weights (strictly: every key, every shape);
    `model` is not changed and shares no memory with the result."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    family = family_of(model)
    dims = family.dims(model.config)
    plan.validate(dims)
    new_config = prune_config(model.config, family, plan)
    source = model.state_dict()
    state_dict = prune_state_dict(family, dims, source, plan, rescale_for(family, model.config, plan))
    shared = {t.untyped_storage().data_ptr() for t in source.values()}  # a weight no axis of which is cut
    state_dict = {k: t.clone() if t.untyped_storage().data_ptr() in shared else t for k, t in state_dict.items()}
    param = next(model.parameters())
    # parameters on the meta device (no memory, no random init), buffers computed for the new shape
    with torch.device(param.device), init_empty_weights(include_buffers=False):
        new = AutoModelForCausalLM.from_config(new_config, dtype=param.dtype)
    if plan.per_layer:
        assign_shapes(new, family, layer_records(new_config), state_dict)
    new.load_state_dict(state_dict, strict=True, assign=True)  # the sliced tensors become the parameters
    if getattr(new_config, "tie_word_embeddings", False):
        new.tie_weights()
    return new.eval()
