"""Parameter counts: of a model (tied weights once), of a config (on the meta device), and of a model pruned to
given dims, exactly, from its parameter names, shapes and the family's axis labels (no model is built).

Below models/loading.py and everything that prunes: the search, the stages and the metrics all count here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from compactlm.errors import CompactLMError
from compactlm.models.family import Dims, Family, family_of

PER_EXPERT = ("effn", "effn2")  # axes indexed differently in each expert (an expert's own neurons)


def named_shapes(model) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape; shared (tied) tensors appear once."""
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _axis_size(label: str, dims: Dims) -> int:
    sizes = {
        "hidden": dims.hidden, "ffn": dims.ffn, "ffn2": 2 * dims.ffn, "q": dims.heads * dims.head_dim,
        "kv": dims.kv_heads * dims.head_dim, "qkv": (dims.heads + 2 * dims.kv_heads) * dims.head_dim,
        "expert": dims.experts, "effn": dims.ffn, "effn2": 2 * dims.ffn,
    }
    return sizes[label]


def param_count(model_or_named_shapes, family: Family, dims: Dims, active: bool = False) -> int:
    """Exact parameters of the teacher pruned to `dims`, from its parameter names, shapes and axis labels.
    `active`: only those one token runs through (the experts' weights count top_k / experts of their size)."""
    shapes = model_or_named_shapes
    if not isinstance(shapes, Mapping):
        shapes = named_shapes(shapes)
    layer_key = re.compile(rf"^{re.escape(family.layers_path)}\.(\d+)\.(.+)$")
    per_layer, total = 0, 0
    for name, shape in shapes.items():
        match = layer_key.match(name)
        if match and match.group(1) != "0":
            continue  # layers are homogeneous: layer 0 stands for all of them
        axes = family.layer_params.get(match.group(2)) if match else family.global_params.get(name)
        if axes is None or len(axes) != len(shape):
            raise CompactLMError(f"{family.name}: weight '{name}' is not described in the family record")
        sizes = (size if label is None else _axis_size(label, dims) for label, size in zip(axes, shape))
        count = math.prod(sizes)
        if active and any(label in PER_EXPERT for label in axes):  # routed experts' weights, not the router
            count = count * dims.top_k // dims.experts
        if match:
            per_layer += count
        else:
            total += count
    return total + per_layer * dims.layers


def num_params(model) -> int:
    """Parameters of a model, tied weights counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def params_of_config(config, active: bool = False) -> int:
    """Parameter count of the model a config describes, without allocating weights (meta device). `active`: of
    a mixture of experts, only those one token runs through (`param_count`)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if not active:
        return num_params(model)
    family = family_of(config)
    return param_count(model, family, family.dims(config), active=True)
