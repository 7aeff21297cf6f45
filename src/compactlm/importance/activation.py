"""Activation importance (Minitron, P1: arXiv 2407.14679): forward hooks that aggregate |activations| per channel.

Sequence aggregation turns a (B, S, C) activation into (B, C) per-sequence scores over non-padding tokens;
batch aggregation reduces those rows across every calibration batch from float32 running statistics
(count, mean, M2), so scoring two batches gives the same result as scoring their concatenation. An
aggregation is named "<batch>_<seq>", e.g. "l2_mean" (the paper's best: L2 over the batch of the
per-sequence mean of |a|).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator

import torch
from torch.utils.hooks import RemovableHandle

from compactlm.errors import CompactLMError
from compactlm.importance.baselines import outgoing_norms
from compactlm.importance.experts import ExpertStats
from compactlm.importance.scores import Scores
from compactlm.models.family import Family, family_of, get_module
from compactlm.models.layerwise import decoder_passes, skeleton

log = logging.getLogger(__name__)

HOWS = ("mean", "l2", "var")
AGGREGATIONS = tuple(f"{batch}_{seq}" for batch in HOWS for seq in HOWS)
HEAD_SCORES = ("paper", "channel")


def parse_aggregation(aggregation: str) -> tuple[str, str]:
    """Split "<batch>_<seq>" into (batch, seq); a one-line error lists the valid names."""
    if aggregation not in AGGREGATIONS:
        raise CompactLMError(f"unknown aggregation '{aggregation}' (choose one of {', '.join(AGGREGATIONS)})")
    batch, seq = aggregation.split("_")
    return batch, seq


def _weights(mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, 1, S) float32 token weights: mask / tokens for "mean"/"var", the 0/1 mask for "l2"."""
    m = mask.to(torch.float32)
    if how != "l2":
        m = m / m.sum(1, keepdim=True).clamp(min=1.0)  # an all-padding row scores 0
    return m.unsqueeze(1)


def _seq_reduce(a: torch.Tensor, w: torch.Tensor, how: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """(B, S, C) activation, (B, 1, S) weights from `_weights` -> (B, C) float32 in two or three passes.

    `out` is float32 scratch shaped like `a` (never `a` itself): reusing one buffer saves an allocation and
    its page faults per hook on CPU. `a` is never written.
    """
    out = torch.empty(a.shape, dtype=torch.float32, device=a.device) if out is None else out
    same = a.dtype == torch.float32
    if how == "mean":
        x = torch.abs(a, out=out) if same else out.copy_(a).abs_()
        return torch.bmm(w, x).squeeze(1)
    if how == "l2":
        x = torch.mul(a, a, out=out) if same else out.copy_(a).square_()
        return torch.bmm(w, x).squeeze(1).sqrt_()
    x = out.copy_(a)
    mean = torch.bmm(w, x)  # (B, 1, C)
    return torch.bmm(w, x.sub_(mean).square_()).squeeze(1)  # population variance, centred: no cancellation


def aggregate_sequence(a: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, S, C) activation, (B, S) 0/1 mask -> (B, C) float32: mean |a|, L2 or variance over real tokens."""
    if how not in HOWS:
        raise CompactLMError(f"unknown sequence aggregation '{how}' (choose one of {', '.join(HOWS)})")
    return _seq_reduce(a, _weights(mask.to(a.device), how), how)


class BatchStats:
    """Float32 running (count, mean, M2) over sequences of (B, *shape) per-sequence scores.

    Batches merge with Chan et al.'s parallel update, so the order and split of batches does not matter and
    the variance has no E[s^2] - E[s]^2 cancellation; mean, L2 (sqrt of the sum of squares = sqrt(M2 +
    count * mean^2)) and population variance all finalise from it.
    """

    def __init__(self, shape: tuple[int, ...], device: torch.device | str = "cpu"):
        self.count = torch.zeros((), dtype=torch.float32, device=device)
        self.mean = torch.zeros(shape, dtype=torch.float32, device=device)
        self.m2 = torch.zeros(shape, dtype=torch.float32, device=device)

    def add_(self, s: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Merge (B, *shape) scores; `valid` (B,) 0/1 leaves rows out (sequences without a real token)."""
        s = s.float()
        v = torch.ones(s.shape[0], device=s.device) if valid is None else valid.to(s.device, torch.float32)
        v = v.view(-1, *([1] * (s.ndim - 1)))  # (B, 1, ...)
        n_b = v.sum()
        mean_b = (v * s).sum(0) / n_b.clamp(min=1.0)
        m2_b = (v * (s - mean_b).square()).sum(0)
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / n.clamp(min=1.0))
        self.m2 += m2_b + delta.square() * (self.count * n_b / n.clamp(min=1.0))
        self.count = n

    def result(self, how: str) -> torch.Tensor:
        """(*shape) float32: mean, L2 norm or population variance over all sequences added so far."""
        if how not in HOWS:
            raise CompactLMError(f"unknown batch aggregation '{how}' (choose one of {', '.join(HOWS)})")
        if float(self.count) == 0:
            raise CompactLMError("importance: the calibration batches hold no non-padding token")
        if how == "mean":
            return self.mean.clone()
        if how == "var":
            return self.m2 / self.count
        return (self.m2 + self.count * self.mean.square()).sqrt()


def aggregate(a: torch.Tensor, mask: torch.Tensor, aggregation: str = "l2_mean") -> torch.Tensor:
    """(B, S, C) activation, (B, S) mask -> (C,) float32 score under "<batch>_<seq>" (for one batch)."""
    batch, seq = parse_aggregation(aggregation)
    stats = BatchStats((a.shape[-1],), a.device)
    stats.add_(aggregate_sequence(a, mask, seq), mask.to(a.device).sum(1) > 0)
    return stats.result(batch)


class ActivationCollector:
    """Hooks' state: each site's (B, C) rows of the current batch folded into that site's float32 `BatchStats`.

    Every site keeps its own statistics, so the layers may run in any order (a whole forward per batch, or
    layer by layer over all batches): each site sees its batches in order and gives the same result.
    """

    def __init__(self, model, family: Family, aggregation: str, head_score: str):
        if head_score not in HEAD_SCORES:
            raise CompactLMError(f"unknown head_score '{head_score}' (choose {', '.join(HEAD_SCORES)})")
        self.batch_how, self.seq_how = parse_aggregation(aggregation)
        self.head_score = head_score
        self.dims = d = family.dims(model.config)
        device = get_module(model, family.embed_path).weight.device
        head_width = d.heads if head_score == "paper" else d.heads * d.head_dim
        widths = {"ffn": d.ffn, "heads": head_width, "hidden": d.hidden}
        sites = {"ffn": d.layers, "heads": d.layers, "hidden": d.layers * len(family.norm_paths)}
        # a mixture of experts scores its experts' neurons over each expert's own tokens (importance/experts.py)
        self.experts = ExpertStats(d.layers, d.experts, d.ffn, device) if family.moe else None
        if self.experts is not None:
            del sites["ffn"]
        self.stats = {k: [BatchStats((widths[k],), device) for _ in range(n)] for k, n in sites.items()}
        self._w: dict[torch.device, torch.Tensor] = {}
        self._rows: torch.Tensor | None = None  # (B,) bool: sequences of the current batch with a real token
        self._scratch: dict[torch.device, torch.Tensor] = {}  # one flat float32 buffer per device

    def set_mask(self, mask: torch.Tensor) -> None:
        """Take the (B, S) mask of the batch about to run."""
        w = _weights(mask, self.seq_how)
        self._w = {w.device: w}
        self._rows = mask.sum(1) > 0
        if self.experts is not None:
            self.experts.set_mask(mask)

    def _scratch_like(self, a: torch.Tensor) -> torch.Tensor:
        """A float32 view shaped like `a` into a buffer reused by every hook (hooks run one at a time)."""
        buf = self._scratch.get(a.device)
        if buf is None or buf.numel() < a.numel():
            buf = self._scratch[a.device] = torch.empty(a.numel(), dtype=torch.float32, device=a.device)
        return buf[: a.numel()].view(a.shape)

    def _weights_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._w:  # a model split across devices
            self._w[device] = next(iter(self._w.values())).to(device)
        return self._w[device]

    def record(self, kind: str, site: int, a: torch.Tensor) -> None:
        """Reduce one (B, S, C) activation over the sequence and fold its (B, C) rows into the site's stats."""
        a = a.detach()  # hooks only read: no graph even when the caller runs with grad enabled
        if kind == "heads" and self.head_score == "paper":
            B, S, _ = a.shape
            per_head = a.reshape(B, S, self.dims.heads, -1)  # (B, S, heads, head_dim)
            dtype = torch.promote_types(a.dtype, torch.float32)  # float32 at least; float64 stays float64
            a = torch.linalg.vector_norm(per_head, dim=-1, dtype=dtype)  # (B, S, heads)
        rows = _seq_reduce(a, self._weights_on(a.device), self.seq_how, self._scratch_like(a))
        stats = self.stats[kind][site]
        stats.add_(rows.to(stats.mean.device), self._rows)

    def _result(self, kind: str) -> torch.Tensor:
        """(sites, C) float32; a one-line error when some site saw fewer sequences than the others."""
        stats = self.stats[kind]
        counts = [float(s.count) for s in stats]
        missing = [i for i, c in enumerate(counts) if c != max(counts)]
        if missing:
            raise CompactLMError(f"importance: {kind} hooks at sites {missing} did not run for every batch")
        return torch.stack([s.result(self.batch_how) for s in stats])

    def scores(self, outgoing: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden,), (layers, heads), (layers, ffn) float32 on CPU (a mixture of experts: (layers, experts, ffn)).
        `outgoing`: the norms of each unit's outgoing weights from `outgoing_norms`, multiplied into every site's
        score before the sum over norms (output-aware activation importance)."""
        d = self.dims
        hidden = self._result("hidden").cpu().view(d.layers, -1, d.hidden)  # one score per norm
        heads = self._result("heads").cpu()
        if self.head_score == "channel":  # Model Optimizer: L2 over the head's channel scores
            heads = torch.linalg.vector_norm(heads.view(d.layers, d.heads, -1), dim=-1)
        ffn = self._result("ffn").cpu() if self.experts is None else self.experts.neuron_scores()
        if outgoing is not None:
            hidden, heads, ffn = hidden * outgoing[0], heads * outgoing[1], ffn * outgoing[2]
        return hidden.sum((0, 1)), heads, ffn


def _hooks(model, family: Family, collector: ActivationCollector) -> Iterator[RemovableHandle]:
    """Pre-hooks on the MLP and attention output projections, hooks on every norm; all return None."""

    def pre(kind: str, site: int):
        def hook(module, args) -> None:
            collector.record(kind, site, args[0])

        return hook

    def post(site: int):
        def hook(module, args, output) -> None:
            collector.record("hidden", site, output)

        return hook

    layers = get_module(model, family.layers_path)
    for i in range(collector.dims.layers):
        layer = layers[i]
        mlp_out = get_module(layer, family.mlp_out_path)
        if collector.experts is not None:  # the experts module: its routing and input, see importance/experts.py
            yield mlp_out.register_forward_hook(collector.experts.hook(i))
        else:
            yield mlp_out.register_forward_pre_hook(pre("ffn", i))
        yield get_module(layer, family.attn_out_path).register_forward_pre_hook(pre("heads", i))
        for j, path in enumerate(family.norm_paths):
            yield get_module(layer, path).register_forward_hook(post(i * len(family.norm_paths) + j))


@contextlib.contextmanager
def collect_activations(model, family: Family, aggregation: str = "l2_mean",
                        head_score: str = "paper") -> Iterator[ActivationCollector]:
    """Hooks that feed an `ActivationCollector`; call `set_mask` before each forward. Always unregisters."""
    collector = ActivationCollector(model, family, aggregation, head_score)
    handles: list[RemovableHandle] = []
    try:
        for handle in _hooks(model, family, collector):
            handles.append(handle)
        yield collector
    finally:
        for handle in handles:
            handle.remove()


def activation_scores(model, batches: Iterable[dict[str, torch.Tensor]], *, aggregation: str = "l2_mean",
                      head_score: str = "paper", output_aware: bool = False, progress: bool = False) -> Scores:
    """Scores hidden (hidden,), heads (layers, heads), ffn (layers, ffn) from no-grad decoder forwards; for a
    mixture of experts ffn (layers, experts, ffn) and the expert metrics "reap_sum", "reap" and "frequency" (experts.py).

    `output_aware`: each unit's score times the L2 norm of the weights it is read through (a neuron's down_proj
    column, a head's o_proj columns, a norm output channel's columns in the projections that read that norm),
    i.e. the size of what the unit writes rather than of the unit's activation alone (method "output_aware").
    `model` is a loaded model or a `Layerwise` (one decoder layer in memory at a time): the same scores."""
    net = skeleton(model)
    family = family_of(net)
    with collect_activations(net, family, aggregation, head_score) as collector:
        decoder_passes(model, batches, lambda b, inputs: collector.set_mask(inputs["attention_mask"]),
                       progress=progress, desc="importance")
        hidden, heads, ffn = collector.scores(outgoing_norms(model) if output_aware else None)
    meta = {"method": "output_aware" if output_aware else "activation", "aggregation": aggregation,
            "head_score": head_score}
    experts = collector.experts.metrics() if collector.experts is not None else {}
    return Scores(hidden=hidden, heads=heads, ffn=ffn, meta=meta, experts=experts)
