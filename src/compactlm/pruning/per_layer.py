"""Per-layer (heterogeneous) widths: each layer keeps its own number of MLP neurons and of attention KV groups,
chosen across layers under the parameter count of a uniform target (ModelOpt's and FLAP's point: layers do not
matter equally, so a uniform cut spends parameters where they matter least).

The rules, after FLAP (An et al. 2024, arXiv 2312.11983): a unit's importance is what it writes into the
residual stream, its activation score times the norm of its column(s) of the output projection (`mlp_out_path`
for a neuron, `attn_out_path` for a KV group and its query heads), ranked globally across layers.
- "write": that product as it is. The residual stream grows with depth, so late layers win most units.
- "relative": that product divided by the residual stream's size where the layer reads it (the mean L2 norm
  of its input hidden states, `stream_norms`): what the unit changes in the normalised stream the next layers
  see. FLAP ranks the variance of each input channel; the activation scores here (importance.aggregation) rank
  its size.

Attention is cut in whole KV groups (with every query head of the group) so that each layer keeps grouped-query
attention's shape; each layer keeps at least one group and one neuron (no attention block is removed whole).
The parameters the uniform target spends per layer on attention buy the same parameters' worth of groups; what
is left over goes to neurons. The hidden size and the layers are the uniform target's.

The per-layer budgets (how many groups and neurons each layer keeps) are searched, after OWL (Yin et al. 2024,
arXiv 2310.05175), which bounds how far a layer's share may move from the uniform one and tunes that bound on a
few calibration rows: `strength` s moves each layer's counts from the uniform target's (s = 0) to the global
ranking's (s = 1) in a straight line, at the same total, and each layer keeps its best units up to its count.
`search_strength` cuts the model once per strength (plain slicing) and keeps the one whose language-model loss
on the calibration rows is lowest. Every strength spends the same parameters.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from compactlm.errors import CompactLMError
from compactlm.importance.scores import Scores
from compactlm.metrics import perplexity
from compactlm.models.family import Dims, Family, get_module
from compactlm.models.params import named_shapes, param_count
from compactlm.pruning.plan import Plan, top_k
from compactlm.pruning.surgery import prune_model


def write_norms(model, family: Family, source: Dims) -> tuple[Tensor, Tensor]:
    """(layers, ffn) the L2 norm of each neuron's column of the MLP output projection and (layers, heads) the
    Frobenius norm of each query head's columns of the attention output projection."""
    layers = get_module(model, family.layers_path)
    ffn, heads = [], []
    for layer in layers:
        down = get_module(layer, family.mlp_out_path).weight.detach().float()  # (hidden, ffn)
        out = get_module(layer, family.attn_out_path).weight.detach().float()  # (hidden, heads * head_dim)
        if down.shape != (source.hidden, source.ffn) or out.shape != (source.hidden, source.heads * source.head_dim):
            raise CompactLMError(f"{family.name}: per-layer widths need (out, in) linear output projections")
        ffn.append(down.norm(dim=0))
        heads.append(out.reshape(source.hidden, source.heads, source.head_dim).norm(dim=(0, 2)))
    return torch.stack(ffn), torch.stack(heads)


def _layer_params(shapes: dict, family: Family, dims: Dims) -> int:
    """Parameters of one layer of shape `dims`."""
    return param_count(shapes, family, replace(dims, layers=1)) - param_count(shapes, family, replace(dims, layers=0))


def stream_norms(model, family: Family, batches) -> Tensor:
    """(layers,) the mean L2 norm of each layer's input hidden states over the real tokens of `batches`."""
    sums, count = None, 0
    with torch.no_grad():
        for batch in batches:
            states = model(**batch, output_hidden_states=True).hidden_states[:-1]  # layer i's input is states[i]
            real = batch["attention_mask"].bool()
            norms = torch.stack([h.float().norm(dim=-1)[real].sum() for h in states])
            sums = norms if sums is None else sums + norms
            count += int(real.sum())
    if sums is None or len(sums) != family.dims(model.config).layers:
        raise CompactLMError("per-layer widths: stream_norms needs calibration batches and every layer's states")
    return sums / count


def per_layer_plan(model, scores: Scores, family: Family, source: Dims, target: Dims, layers: Tensor,
                   streams: Tensor | None = None, strength: float = 1.0) -> Plan:
    """A per-layer plan with the parameters of the uniform `target` over the kept `layers` (see the module's
    docstring). scores: the model's importance scores (heads (layers, heads), ffn (layers, ffn)); streams:
    `stream_norms` for the "relative" rule, None for "write"; strength: 1 the global ranking's budgets per layer,
    0 the uniform target's, in between a straight line."""
    if not 0.0 <= strength <= 1.0:
        raise CompactLMError(f"per-layer widths: strength {strength} must lie in [0, 1]")
    if source.experts:
        raise CompactLMError("per-layer widths: a mixture of experts keeps one shape")
    shapes = named_shapes(model)
    ffn_norm, head_norm = write_norms(model, family, source)
    kept = layers.tolist()
    scale = torch.ones(source.layers) if streams is None else 1.0 / streams.float()  # (layers,)
    neuron = scores.ffn.float() * ffn_norm * scale[:, None]  # (layers, ffn)
    group = (scores.heads.float() * head_norm).reshape(source.layers, source.kv_heads, source.groups).norm(dim=2)
    group = group * scale[:, None]  # (layers, kv_heads)
    # costs in parameters, from the family's own accounting (norms and output biases do not scale)
    cost = lambda **sizes: _layer_params(shapes, family, replace(target, **sizes))  # noqa: E731
    fixed = cost(ffn=0, heads=0, kv_heads=0)
    per_neuron = cost(ffn=1, heads=0, kv_heads=0) - fixed
    per_group = cost(ffn=0, heads=source.groups, kv_heads=1) - fixed  # a KV group with all its query heads
    attention = len(kept) * (cost() - cost(heads=0, kv_heads=0))  # what the uniform target spends on it
    n_groups = max(len(kept), min(len(kept) * source.kv_heads, round(attention / per_group)))
    n_neurons = (len(kept) * (cost() - fixed) - n_groups * per_group) // per_neuron
    groups = _allocate(group[kept], n_groups, strength)  # (kept, kv_heads) bool
    neurons = _allocate(neuron[kept], n_neurons, strength)  # (kept, ffn) bool
    heads, kv_heads, ffn = [torch.empty(0, dtype=torch.long)] * source.layers, [torch.empty(0, dtype=torch.long)] * \
        source.layers, [torch.empty(0, dtype=torch.long)] * source.layers
    for j, i in enumerate(kept):
        kv_heads[i] = groups[j].nonzero().squeeze(1)
        heads[i] = (kv_heads[i][:, None] * source.groups + torch.arange(source.groups)).reshape(-1)
        ffn[i] = neurons[j].nonzero().squeeze(1)
    plan = Plan(top_k(scores.hidden, target.hidden), heads, kv_heads, ffn, layers)
    plan.validate(source)
    return plan


def _allocate(scores: Tensor, n: int, strength: float = 1.0) -> Tensor:
    """(layers, units) -> bool mask keeping `n` units. Strength 1: each layer's best, then the best of the rest
    globally; below 1 each layer's count moves toward n / layers (`_budgets`) and it keeps its best units."""
    layers, units = scores.shape
    if not layers <= n <= layers * units:
        raise CompactLMError(f"per-layer widths: cannot keep {n} of {layers} x {units} units, at least one a layer")
    keep = torch.zeros(layers, units, dtype=torch.bool)
    keep[torch.arange(layers), scores.argmax(dim=1)] = True
    rest = scores.masked_fill(keep, float("-inf")).reshape(-1)
    order = torch.argsort(rest, descending=True, stable=True)[: n - layers]
    keep.view(-1)[order] = True
    if strength == 1.0:
        return keep
    counts = _budgets(keep.sum(dim=1), n, strength)
    ranks = torch.argsort(torch.argsort(scores, dim=1, descending=True, stable=True), dim=1)  # 0: the layer's best
    return ranks < counts[:, None]


def _budgets(ranked: Tensor, n: int, strength: float) -> Tensor:
    """(layers,) integer counts summing to `n`: uniform + strength x (`ranked` - uniform), rounded by largest
    remainder (each stays within the range its two ends span)."""
    uniform = n / len(ranked)
    exact = uniform + strength * (ranked.double() - uniform)
    counts = exact.floor().long()
    short = n - int(counts.sum())
    counts[torch.argsort(exact - counts, descending=True, stable=True)[:short]] += 1
    return counts


def search_strength(model, plans: dict[float, Plan], batches: list) -> tuple[float, dict[float, float]]:
    """(the strength whose plan, cut from `model` by plain slicing, has the lowest language-model loss on
    `batches`, each strength's loss). A non-finite loss never wins; on a tie the first strength does."""
    losses = {}
    for strength, plan in plans.items():
        student = prune_model(model, plan)
        losses[strength] = perplexity(student, batches)["loss"]
        del student
    finite = [s for s in plans if math.isfinite(losses[s])]
    if not finite:
        raise CompactLMError("per-layer widths: every strength's cut model gave a non-finite loss")
    return min(finite, key=lambda s: losses[s]), losses


def plan_params(model, family: Family, source: Dims, plan: Plan) -> int:
    """Exact parameters of `model` pruned by a (per-layer or uniform) `plan`."""
    shapes = named_shapes(model)
    layer_dims = plan.layer_dims(source)
    return param_count(shapes, family, replace(layer_dims[0], layers=0)) + sum(
        _layer_params(shapes, family, d) for d in layer_dims)
