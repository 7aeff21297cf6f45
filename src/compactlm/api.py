"""`prune_to`: importance, target, plan and surgery in one call, for your own scripts and notebooks.

At the package's top, above importance and pruning (which it composes), beside the stages."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from compactlm.config import ImportanceConfig, PruneConfig, TargetConfig
from compactlm.errors import CompactLMError
from compactlm.importance import score
from compactlm.importance.layers import with_depth_metrics
from compactlm.importance.scores import Scores
from compactlm.models.family import family_of
from compactlm.pruning.plan import make_plan
from compactlm.pruning.reconstruct import reconstruct
from compactlm.pruning.surgery import prune_model
from compactlm.pruning.targets import depth_metrics_needed, layers_to_drop, resolve_target


def prune_to(model: nn.Module, target: TargetConfig, batches: Iterable[dict[str, torch.Tensor]] | None = None, *,
             importance: ImportanceConfig = ImportanceConfig(), prune: PruneConfig = PruneConfig(),
             scores: Scores | None = None, seed: int = 0) -> nn.Module:
    """A new model cut to `target`; `model` is unchanged.

    Keep indices come from `scores` when given, else from `importance` on the calibration `batches`
    ({"input_ids", "attention_mask"}, each (B, S)); the depth metric that `target.layer_metric` names is
    computed when layers are dropped. With `batches`, the cut projections are then refitted as `prune` says
    (`prune.reconstruct`, pruning/reconstruct.py); without them the weights are only sliced. Example:

        small = compactlm.prune_to(model, TargetConfig(hidden_size=384, intermediate_size=0.5), batches)
    """
    family = family_of(model)
    source = family.dims(model.config)
    dims = resolve_target(target, source, family)  # shape errors before any forward pass
    needed = depth_metrics_needed(target, [source.layers - dims.layers])
    batches = list(batches) if batches is not None else None
    if scores is None:
        scores = score(model, batches, method=importance.method, aggregation=importance.aggregation,
                       head_score=importance.head_score, layer_metrics=(), seed=seed)
    if any(n not in scores.layers for n in needed):
        if batches is None:
            raise CompactLMError(f"prune_to: the scores lack the depth metric {needed[0]}: pass batches")
        scores = with_depth_metrics(model, batches, scores, needed)
    drop = layers_to_drop(target, source, dims.layers, scores)
    plan = make_plan(scores, source, dims, drop)
    pruned = prune_model(model, plan)
    if batches is not None and prune.reconstruct != "none":
        reconstruct(model, pruned, plan, batches, sites=prune.reconstruct, inputs=prune.reconstruct_inputs,
                    ridge=prune.ridge)
    return pruned
