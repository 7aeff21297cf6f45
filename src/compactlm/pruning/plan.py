"""A pruning plan: sorted keep indices for every axis, chosen from importance scores and a target shape."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from compactlm.errors import CompactLMError, read_json
from compactlm.importance.scores import Scores
from compactlm.models.family import Dims


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the k highest scores (ties broken by lower index)."""
    order = torch.argsort(scores.float(), descending=True, stable=True)
    return order[:k].sort().values


@dataclass(frozen=True)
class Plan:
    """What stays. Per-layer entries are indexed by the ORIGINAL layer number."""

    hidden: torch.Tensor  # (hidden',) residual channels
    heads: list[torch.Tensor]  # per layer (heads',) query heads, in [0, heads)
    kv_heads: list[torch.Tensor]  # per layer (kv_heads',) KV groups, in [0, kv_heads)
    ffn: list[torch.Tensor]  # per layer (ffn',) MLP neurons; MoE: (experts', ffn') each kept expert's neurons
    layers: torch.Tensor  # (layers',) decoder layers
    experts: list[torch.Tensor] = field(default_factory=list)  # MoE: per layer (experts',) routed experts

    def dims(self, source: Dims) -> Dims:
        """The shape after pruning."""
        first = int(self.layers[0])
        return Dims(
            hidden=len(self.hidden), ffn=self.ffn[first].shape[-1], heads=len(self.heads[first]),
            kv_heads=len(self.kv_heads[first]), head_dim=source.head_dim, layers=len(self.layers), vocab=source.vocab,
            experts=len(self.experts[first]) if self.experts else 0, top_k=source.top_k,
        )

    def layer_dims(self, source: Dims) -> list[Dims]:
        """The shape of each kept layer (a per-layer plan's layers differ in ffn, heads and kv_heads)."""
        return [replace(self.dims(source), ffn=self.ffn[i].shape[-1], heads=len(self.heads[i]),
                        kv_heads=len(self.kv_heads[i])) for i in self.layers.tolist()]

    @property
    def per_layer(self) -> bool:
        """Its kept layers differ in shape (heterogeneous widths, `pruning.per_layer`)."""
        return len({(self.ffn[i].shape, len(self.heads[i]), len(self.kv_heads[i])) for i in self.layers.tolist()}) > 1

    def validate(self, source: Dims) -> None:
        """Check indices are sorted, in range, consistent with GQA and, unless the plan is per-layer (dense
        models only), homogeneous across kept layers."""
        _check_keep("hidden", self.hidden, source.hidden)
        _check_keep("layers", self.layers, source.layers)
        if len(self.layers) == 0:
            raise CompactLMError("plan keeps no layers")
        if self.per_layer and source.experts:
            raise CompactLMError("a per-layer plan needs a dense model: a mixture of experts keeps one shape")
        new = self.dims(source)
        if bool(self.experts) != bool(source.experts):
            raise CompactLMError("plan.experts must list the kept experts of a mixture-of-experts model, and only then")
        for layer in self.layers.tolist():
            if source.experts:
                _check_keep(f"experts[{layer}]", self.experts[layer], source.experts, size=new.experts)
                if self.ffn[layer].ndim != 2 or len(self.ffn[layer]) != new.experts:
                    raise CompactLMError(f"plan.ffn[{layer}] must hold one row of neurons per kept expert")
                for e, neurons in enumerate(self.ffn[layer]):
                    _check_keep(f"ffn[{layer}][{e}]", neurons, source.ffn, size=new.ffn)
            else:
                _check_keep(f"ffn[{layer}]", self.ffn[layer], source.ffn, size=None if self.per_layer else new.ffn)
            if not len(self.heads[layer]) or not len(self.ffn[layer]):
                raise CompactLMError(f"plan layer {layer} keeps no attention head or no MLP neuron")
            _check_keep(f"heads[{layer}]", self.heads[layer], source.heads, size=None if self.per_layer else new.heads)
            _check_keep(f"kv_heads[{layer}]", self.kv_heads[layer], source.kv_heads,
                        size=None if self.per_layer else new.kv_heads)
            groups_of_heads = torch.div(self.heads[layer], source.groups, rounding_mode="floor")
            per_group = torch.bincount(groups_of_heads, minlength=source.kv_heads)[self.kv_heads[layer]]
            if set(groups_of_heads.tolist()) - set(self.kv_heads[layer].tolist()) or len(set(per_group.tolist())) != 1:
                raise CompactLMError(
                    f"plan layer {layer}: kept query heads must sit in kept KV groups, the same number in each"
                )

    def to_json(self) -> dict:
        """Plain lists, for plan.json."""
        kept = self.layers.tolist()
        return {
            "hidden": self.hidden.tolist(),
            "layers": kept,
            "heads": {str(i): self.heads[i].tolist() for i in kept},
            "kv_heads": {str(i): self.kv_heads[i].tolist() for i in kept},
            "ffn": {str(i): self.ffn[i].tolist() for i in kept},
        } | ({"experts": {str(i): self.experts[i].tolist() for i in kept}} if self.experts else {})

    def save(self, path: str | Path, **extra) -> None:
        """Write plan.json (extra keys, e.g. source and target shapes, go beside the indices)."""
        Path(path).write_text(json.dumps(extra | self.to_json(), indent=1) + "\n")

    @classmethod
    def from_json(cls, data: dict, source: Dims) -> "Plan":
        """Read a plan written by `to_json` (layers not kept get empty entries)."""

        def per_layer(key: str) -> list[torch.Tensor]:
            return [torch.tensor(data[key].get(str(i), []), dtype=torch.long) for i in range(source.layers)]

        return cls(
            hidden=torch.tensor(data["hidden"], dtype=torch.long), heads=per_layer("heads"),
            kv_heads=per_layer("kv_heads"), ffn=per_layer("ffn"), layers=torch.tensor(data["layers"], dtype=torch.long),
            experts=per_layer("experts") if "experts" in data else [],
        )


def read_hidden_keep(model_dir: str | Path) -> torch.Tensor | None:
    """(hidden',) teacher channels a pruned checkpoint kept, from the plan.json beside it; None without one."""
    path = Path(model_dir) / "plan.json"
    if not path.is_file():
        return None
    try:
        return torch.tensor(read_json(path)["hidden"], dtype=torch.long)
    except (ValueError, KeyError, TypeError) as e:
        raise CompactLMError(f"cannot read the pruning plan {path}: {e}") from None


def _check_keep(name: str, keep: torch.Tensor, limit: int, size: int | None = None) -> None:
    if keep.dtype != torch.long or keep.ndim != 1:
        raise CompactLMError(f"plan.{name} must be a 1-D LongTensor")
    if len(keep) and (int(keep.min()) < 0 or int(keep.max()) >= limit):
        raise CompactLMError(f"plan.{name} has indices outside [0, {limit})")
    if len(keep) > 1 and not bool((keep[1:] > keep[:-1]).all()):
        raise CompactLMError(f"plan.{name} must be sorted and unique")
    if size is not None and len(keep) != size:
        raise CompactLMError(f"plan.{name} keeps {len(keep)}, other layers keep {size}: layers must stay homogeneous")


def keep_all(source: Dims) -> Plan:
    """The identity plan."""
    every = lambda n: torch.arange(n)  # noqa: E731
    ffn = every(source.ffn).expand(source.experts, -1) if source.experts else every(source.ffn)
    return Plan(
        hidden=every(source.hidden), heads=[every(source.heads)] * source.layers,
        kv_heads=[every(source.kv_heads)] * source.layers, ffn=[ffn] * source.layers,
        layers=every(source.layers), experts=[every(source.experts)] * source.layers if source.experts else [],
    )


def select_heads(head_scores: torch.Tensor, source: Dims, heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep `heads` query heads in `kv_heads` KV groups of one layer: (heads,) scores -> (q keep, kv keep).

    Groups are ranked by the L2 norm of their query heads' scores; inside each kept group the top
    heads/kv_heads query heads stay (Model Optimizer's default when kv_heads is unchanged).
    """
    by_group = head_scores.float().reshape(source.kv_heads, source.groups)  # (kv_heads, groups)
    kv_keep = top_k(by_group.norm(dim=1), kv_heads)
    per_group = heads // kv_heads
    q_keep = [g * source.groups + top_k(by_group[g], per_group) for g in kv_keep.tolist()]
    return torch.cat(q_keep), kv_keep


def select_experts(scores: Scores, source: Dims, target: Dims, metric: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the top `target.experts` experts by the expert metric `metric` (`Scores.experts`), and each
    kept expert's top `target.ffn` neurons: ((experts',), (experts', ffn')) per layer."""
    if metric not in scores.experts:
        held = f"only {', '.join(sorted(scores.experts))}" if scores.experts else "no expert metric"
        raise CompactLMError(f"target.expert_metric={metric}: the scores hold {held}")
    experts = [top_k(scores.experts[metric][layer], target.experts) for layer in range(source.layers)]
    ffn = [torch.stack([top_k(scores.ffn[layer][e], target.ffn) for e in experts[layer].tolist()])
           for layer in range(source.layers)]
    return experts, ffn


def kept_layers(layers: int, drop_layers: list[int]) -> torch.Tensor:
    """The indices of the `layers` a plan keeps when it drops `drop_layers`, in order."""
    return torch.tensor(sorted(set(range(layers)) - set(drop_layers)), dtype=torch.long)


def make_plan(scores: Scores, source: Dims, target: Dims, drop_layers: list[int], expert_metric: str = "reap_sum") -> Plan:
    """Choose keep indices for `target` from `scores`; `drop_layers` lists the original layers to remove;
    `expert_metric` ranks the experts of a mixture-of-experts model (`Scores.experts`)."""
    layers = kept_layers(source.layers, drop_layers)
    heads, kv_heads = [], []
    for layer in range(source.layers):
        q, kv = select_heads(scores.heads[layer], source, target.heads, target.kv_heads)
        heads.append(q)
        kv_heads.append(kv)
    if source.experts:
        experts, ffn = select_experts(scores, source, target, expert_metric)
    else:
        experts, ffn = [], [top_k(scores.ffn[layer], target.ffn) for layer in range(source.layers)]
    plan = Plan(top_k(scores.hidden, target.hidden), heads, kv_heads, ffn, layers, experts)
    plan.validate(source)
    return plan
