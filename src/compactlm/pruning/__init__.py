"""Pruning: choose keep indices from scores and a target (plan, targets), then cut (surgery)."""

from compactlm.pruning.plan import Plan, keep_all, make_plan, select_heads, top_k
from compactlm.pruning.surgery import head_channels, prune_config, prune_model, prune_state_dict
from compactlm.pruning.targets import depth_metrics_needed, layers_to_drop, resolve_target

__all__ = [
    "Plan", "keep_all", "make_plan", "select_heads", "top_k", "head_channels", "prune_config", "prune_model",
    "prune_state_dict", "depth_metrics_needed", "layers_to_drop", "resolve_target",
]
