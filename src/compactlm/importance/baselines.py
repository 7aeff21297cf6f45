"""Baselines that need no calibration data: seeded random scores and weight magnitude.

Magnitude scores (float32, from the family's axis labels, tied weights counted once):
- ffn neuron: L2 norm of every parameter entry on its "ffn" axis (gate/up rows and biases, down column;
  GPT-2's Conv1D c_fc column and bias, c_proj row; both rows of Phi-3's fused gate_up_proj).
- head: L2 norm of its q rows (and q bias) plus its o_proj columns, a head_dim block each (GPT-2: the q
  third of c_attn's fused axis and c_proj's rows).
- hidden channel: L2 norm of every parameter entry that reads or writes the channel: embedding (and
  position embedding) column, q/k/v/gate/up columns, o/down rows and biases, every norm weight and bias, the
  final norm and an untied lm_head column.
- layer metric "magnitude": L2 norm of all of the layer's parameters.
- mixtures of experts: each expert's neurons as an ffn neuron inside that expert's tensors; expert metric
  "magnitude": L2 norm of the expert's weights and its router row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from compactlm.importance.scores import Scores
from compactlm.models.family import Axes, Dims, Family, family_of
from compactlm.models.layerwise import Layerwise, skeleton


def random_scores(model, seed: int = 0) -> Scores:
    """Uniform [0, 1) scores of every shape from a seeded generator, with a "random" layer metric."""
    d = family_of(skeleton(model)).dims(skeleton(model).config)
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(shape, generator=g, dtype=torch.float32)  # noqa: E731
    scores = Scores(hidden=rand(d.hidden), heads=rand(d.layers, d.heads), ffn=rand(d.layers, d.ffn),
                    layers={"random": rand(d.layers)}, meta={"method": "random", "seed": str(seed)})
    if not d.experts:
        return scores
    return dataclasses.replace(scores, ffn=rand(d.layers, d.experts, d.ffn), experts={"random": rand(d.layers, d.experts)})


def _sumsq_along(p: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of squares over every axis but `dim`: (p.shape[dim],) float32."""
    sq = p.detach().float().square()
    return sq.sum([d for d in range(sq.ndim) if d != dim]) if sq.ndim > 1 else sq


def _axis_sumsq(p: torch.Tensor, axes: Axes, axis: str, q_width: int) -> torch.Tensor | None:
    """Per-channel sum of squares along `axis` ("q" also reads the q part of a fused "qkv" axis, "ffn" both
    halves of a fused "ffn2" one, and each expert's neurons, (experts, ffn), of an "expert" tensor), or None."""
    if axis in axes:
        return _sumsq_along(p, axes.index(axis))
    if axis == "ffn" and ("effn" in axes or "effn2" in axes):  # expert at dim 0, its neurons on another axis
        label = "effn" if "effn" in axes else "effn2"
        sq = p.detach().float().square().movedim(axes.index(label), 1)  # (experts, n, ...)
        sq = sq.sum(list(range(2, sq.ndim)))
        return sq if label == "effn" else sum(sq.chunk(2, dim=1))  # fused [gate | up]
    if axis == "ffn" and "ffn2" in axes:
        gate, up = _sumsq_along(p, axes.index("ffn2")).chunk(2)  # fused [gate | up]
        return gate + up
    if axis == "q" and "qkv" in axes:
        dim = axes.index("qkv")
        return _sumsq_along(p.narrow(dim, 0, q_width), dim)  # fused [q | k | v]: q comes first
    return None


def _params(model) -> tuple[Family, Dims, Mapping[str, torch.Tensor]]:
    """The family, shape and parameters by name (a `Layerwise`'s memory-mapped from its shards)."""
    net = skeleton(model)
    family = family_of(net)
    params = model.parameters_from_shards() if isinstance(model, Layerwise) else dict(net.named_parameters())
    return family, family.dims(net.config), params


def outgoing_norms(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2 norms of the weights through which each unit is read, float32:
    (layers, norms, hidden): each norm's output channels (`Family.norm_paths`), over the columns of the
    projections that read that norm (q/k/v for a pre-attention norm, gate/up for a pre-MLP one; `Family.reads`),
    1 for a post-norm, whose output is written to the residual stream as it is;
    (layers, heads): each head's o_proj columns (its head_dim block); (layers, ffn): each neuron's down_proj column."""
    family, d, params = _params(model)
    q_width = d.heads * d.head_dim
    reads = dict(zip(("attn", "mlp"), family.reads()))
    hidden = torch.zeros(d.layers, len(family.norm_paths), d.hidden)
    heads, ffn = torch.zeros(d.layers, q_width), torch.zeros(d.layers, d.ffn)
    axes_of = lambda path: family.layer_params[path + ".weight"]  # noqa: E731
    for i in range(d.layers):
        prefix = f"{family.layers_path}.{i}."
        weight = lambda path: params[prefix + path + ".weight"]  # noqa: E731,B023
        ffn[i] = _axis_sumsq(weight(family.mlp_out_path), axes_of(family.mlp_out_path), "ffn", q_width)
        heads[i] = _axis_sumsq(weight(family.attn_out_path), axes_of(family.attn_out_path), "q", q_width)
        for j, read in enumerate(family.norm_reads):
            if read is None:
                hidden[i, j] = 1.0
            for path in reads.get(read, ()):
                hidden[i, j] += _axis_sumsq(weight(path), axes_of(path), "hidden", q_width)
    return hidden.sqrt(), heads.view(d.layers, d.heads, d.head_dim).sum(-1).sqrt(), ffn.sqrt()


def magnitude_scores(model) -> Scores:
    """Weight-magnitude hidden (hidden,), heads (layers, heads), ffn (layers, ffn); layer "magnitude".

    `model`: a loaded model, or a `Layerwise` (each weight read from its memory-mapped shard in turn)."""
    family, d, params = _params(model)
    q_width = d.heads * d.head_dim
    hidden = torch.zeros(d.hidden)
    heads, total = torch.zeros(d.layers, q_width), torch.zeros(d.layers)
    ffn = torch.zeros(d.layers, *((d.experts,) if d.experts else ()), d.ffn)
    experts = torch.zeros(d.layers, d.experts)
    for name, axes in family.global_params.items():
        if name in params and (s := _axis_sumsq(params[name], axes, "hidden", q_width)) is not None:
            hidden += s
    for i in range(d.layers):
        prefix = f"{family.layers_path}.{i}."
        own = [p for n, p in params.items() if n.startswith(prefix)]
        total[i] = sum(float(p.detach().float().square().sum()) for p in own)
        for suffix, axes in family.layer_params.items():
            p = params.get(prefix + suffix)
            if p is None:  # an optional bias this config has not got
                continue
            for axis, out in (("hidden", hidden), ("q", heads[i]), ("ffn", ffn[i]), ("expert", experts[i])):
                if (s := _axis_sumsq(p, axes, axis, q_width)) is not None:
                    out += s
    heads = heads.view(d.layers, d.heads, d.head_dim).sum(-1)
    return Scores(hidden=hidden.sqrt(), heads=heads.sqrt(), ffn=ffn.sqrt(), layers={"magnitude": total.sqrt()},
                  meta={"method": "magnitude"}, experts={"magnitude": experts.sqrt()} if d.experts else {})
