"""Importance scoring: activation scores (width), depth metrics, random and magnitude baselines."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch

from compactlm.errors import CompactLMError
from compactlm.importance import layers as depth
from compactlm.importance.activation import (
    AGGREGATIONS,
    HEAD_SCORES,
    BatchStats,
    activation_scores,
    aggregate,
    aggregate_sequence,
    collect_activations,
)
from compactlm.importance.baselines import magnitude_scores, random_scores
from compactlm.importance.layers import (
    LAYER_METRICS,
    block_importance,
    contiguous_block_losses,
    layer_metrics,
    lm_loss,
    lm_loss_importance,
    skip_layers,
)
from compactlm.importance.scores import Scores
from compactlm.importance.taylor import taylor_scores
from compactlm.models.family import family_of
from compactlm.models.layerwise import skeleton

METHODS = ("activation", "output_aware", "taylor", "magnitude", "random")


def score(model, batches: Iterable[dict[str, torch.Tensor]] | None, *, method: str = "activation",
          aggregation: str = "l2_mean", head_score: str = "paper",
          layer_metrics: Sequence[str] = ("lm_loss", "block_importance"), seed: int = 0,
          progress: bool = False) -> Scores:
    """Width scores and layer metrics; "random"/"magnitude" need no batches and give only their own metric.

    Methods: "activation" (P1's activation score), "output_aware" (that, times each unit's outgoing weight
    norm), "taylor" (first-order Taylor on activations; needs a backward pass), "magnitude", "random"."""
    if method == "random":
        return random_scores(model, seed)
    if method == "magnitude":
        return magnitude_scores(model)
    if method not in METHODS:
        raise CompactLMError(f"unknown importance method '{method}' (choose one of {', '.join(METHODS)})")
    if batches is None:
        raise CompactLMError(f"importance method '{method}' needs calibration batches")
    if method in ("output_aware", "taylor") and family_of(skeleton(model)).moe:
        raise CompactLMError(f"importance.method={method} does not handle mixtures of experts yet "
                             "(use activation, magnitude or random)")
    unknown = [m for m in layer_metrics if m not in LAYER_METRICS]
    if unknown:  # fail before the slow passes
        raise CompactLMError(f"unknown layer metric '{unknown[0]}' (choose from {', '.join(LAYER_METRICS)})")
    batches = list(batches)  # several passes: width scores, then each layer metric
    if method == "taylor":
        width = taylor_scores(model, batches, progress=progress)
    else:
        width = activation_scores(model, batches, aggregation=aggregation, head_score=head_score,
                                  output_aware=method == "output_aware", progress=progress)
    layers = depth.layer_metrics(model, batches, layer_metrics)
    return dataclasses.replace(width, layers=layers)


__all__ = [
    "AGGREGATIONS",
    "HEAD_SCORES",
    "LAYER_METRICS",
    "METHODS",
    "BatchStats",
    "Scores",
    "activation_scores",
    "aggregate",
    "aggregate_sequence",
    "block_importance",
    "collect_activations",
    "contiguous_block_losses",
    "layer_metrics",
    "lm_loss",
    "lm_loss_importance",
    "magnitude_scores",
    "random_scores",
    "score",
    "skip_layers",
    "taylor_scores",
]
