"""Turn `target.*` keys into a checked target shape and a list of layers to drop."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from compactlm.config import TargetConfig
from compactlm.errors import CompactLMError
from compactlm.importance.scores import Scores
from compactlm.models.family import Dims, Family

# target key -> Dims field
TARGET_KEYS = {
    "hidden_size": "hidden",
    "intermediate_size": "ffn",
    "num_attention_heads": "heads",
    "num_key_value_heads": "kv_heads",
    "num_hidden_layers": "layers",
}
MOE_KEYS = ("num_experts", "num_local_experts", "moe_intermediate_size")  # named by each MoE family's config


def target_keys(family: Family) -> dict[str, str]:
    """Target key -> Dims field for `family`: a mixture of experts names its expert count and each expert's
    width as its config does (Qwen3-MoE: num_experts, moe_intermediate_size; Mixtral: num_local_experts,
    intermediate_size)."""
    if not family.moe:
        return TARGET_KEYS
    dense = {key: field for key, field in TARGET_KEYS.items() if field != "ffn"}
    return dense | {family.keys["ffn"]: "ffn", family.keys["experts"]: "experts"}


def _size(key: str, value: int | float | None, source: int, round_to: int | None) -> int:
    """An absolute size, or a fraction of `source` to keep, optionally rounded down to a multiple."""
    if value is None:
        return source
    if isinstance(value, float):  # TargetConfig has checked it lies in (0, 1]
        value = max(1, round(source * value))
    if round_to and key in ("hidden_size", "intermediate_size", "moe_intermediate_size") and value != source:
        value = max(round_to, value // round_to * round_to)
    if value > source:
        raise CompactLMError(f"target.{key}={value} is larger than the source model's {source}")
    return value


def resolve_target(target: TargetConfig, source: Dims, family: Family) -> Dims:
    """The target shape; a one-line error names the key or config constraint it breaks."""
    keys = target_keys(family)
    foreign = [key for key in (*TARGET_KEYS, *MOE_KEYS) if getattr(target, key) is not None and key not in keys]
    if foreign:
        raise CompactLMError(f"target.{foreign[0]}: {family.name} has no such size (its sizes: "
                             f"{', '.join(f'target.{k}' for k in keys)})")
    sizes = {
        field: _size(key, getattr(target, key), getattr(source, field), target.round_to)
        for key, field in keys.items()
    }
    if target.drop_layers is not None:
        if target.num_hidden_layers is not None and source.layers - len(set(target.drop_layers)) != sizes["layers"]:
            raise CompactLMError("target.drop_layers and target.num_hidden_layers disagree")
        bad = [i for i in target.drop_layers if not 0 <= i < source.layers]
        if bad:
            raise CompactLMError(f"target.drop_layers: {bad} out of range for a model of {source.layers} layers")
        if len(set(target.drop_layers)) >= source.layers:
            raise CompactLMError(f"target.drop_layers drops {len(set(target.drop_layers))} of {source.layers} layers")
        sizes["layers"] = source.layers - len(set(target.drop_layers))
    if target.num_key_value_heads is None and source.kv_heads == source.heads:
        sizes["kv_heads"] = sizes["heads"]  # no grouped-query attention (every GPT-2): heads stay their own groups
    dims = Dims(head_dim=source.head_dim, vocab=source.vocab, top_k=source.top_k, **sizes)
    family.check(dims)
    if dims.heads // dims.kv_heads > source.groups:
        raise CompactLMError(
            f"target keeps {dims.heads // dims.kv_heads} query heads per KV group; the source has only {source.groups}"
        )
    return dims


def layers_to_drop(target: TargetConfig, source: Dims, new_layers: int, scores: Scores) -> list[int]:
    """Original indices of the layers to remove: explicit, or the least important by `target.layer_metric`."""
    n = source.layers - new_layers
    if target.drop_layers is not None:
        return sorted(set(target.drop_layers))
    if n == 0:
        return []
    metric = target.layer_metric
    if metric == "contiguous":
        key = f"contiguous_{n}"
        if key not in scores.layers:
            raise CompactLMError(f"scores have no contiguous-block losses for blocks of {n} layers")
        losses = scores.layers[key].clone()  # (layers - n + 1,) LM loss with block s..s+n-1 removed
        if target.keep_last_layer and len(losses) > 1:
            losses[-1] = float("inf")
        start = int(torch.argmin(losses))
        return list(range(start, start + n))
    if metric not in scores.layers:
        raise CompactLMError(
            f"target.layer_metric={metric}: the scores hold only {', '.join(sorted(scores.layers)) or 'no layer metrics'}"
        )
    order = torch.argsort(scores.layers[metric].float(), stable=True)  # least important first
    return sorted(order[:n].tolist())


def depth_metrics_needed(target: TargetConfig, drops: Iterable[int]) -> tuple[str, ...]:
    """The depth metrics `layers_to_drop` needs for each count of layers dropped in `drops`."""
    if target.drop_layers is not None or target.layer_metric in ("random", "magnitude"):
        return ()  # explicit layers, or metrics that random/magnitude scores carry themselves
    names = [f"contiguous_{n}" if target.layer_metric == "contiguous" else target.layer_metric
             for n in sorted(set(drops)) if n > 0]
    return tuple(dict.fromkeys(names))
