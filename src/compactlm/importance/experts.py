"""Importance inside mixture-of-experts layers: which experts matter, and which neurons inside each.

transformers 5 runs a layer's experts as one module, `experts(hidden (T, H), top_k_index (T, k),
top_k_weights (T, k)) -> (T, H)`, with the weights of all experts fused in 3-D tensors. A forward hook on that
module sees every token's routing; for each expert it recomputes the expert on the tokens routed to it
(act = act_fn(gate) * up, out = down(act)), in the module's own dtype, and accumulates in float32:

- routing frequency: the share of routed slots the expert receives (the baseline);
- REAP (Lasby et al. 2025, "router-weighted expert activation pruning"): the mean over the tokens routed to
  the expert of the router weight times the norm of the expert's output, g_e(x) * ||E_e(x)||, i.e. how much
  the expert adds to the layer's output when it is chosen;
- reap_sum: the same products summed over the tokens instead of averaged (per routed slot of the layer):
  how much the expert adds to the layer's output over all tokens, REAP x frequency. It keeps a workhorse
  expert that REAP's mean ranks below a rarely chosen one; it is the default (benchmarks/bench_moe_experts.py);
- each expert's neurons: mean |act| over the tokens routed to it (the dense MLP's activation score, over the
  expert's own tokens; a sequence-level aggregation does not apply to the sparse tokens an expert sees).

Padding tokens are left out. An expert no calibration token reached scores 0 on every metric.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EXPERT_METRICS = ("reap_sum", "reap", "frequency")


class ExpertStats:
    """Float32 sums for the experts of every layer: routed tokens, router-weighted output norms, |act|."""

    def __init__(self, layers: int, experts: int, ffn: int, device: torch.device | str = "cpu"):
        self.tokens = torch.zeros(layers, experts, dtype=torch.float32, device=device)
        self.mass = torch.zeros(layers, experts, dtype=torch.float32, device=device)
        self.neurons = torch.zeros(layers, experts, ffn, dtype=torch.float32, device=device)
        self.real: torch.Tensor | None = None  # (B * S,) bool: the current batch's non-padding tokens

    def set_mask(self, mask: torch.Tensor) -> None:
        """Take the (B, S) mask of the batch about to run."""
        self.real = mask.reshape(-1).bool()

    def hook(self, layer: int):
        """A forward hook for layer `layer`'s experts module."""

        def hook(module, args, output) -> None:
            hidden, index, weights = args[:3]
            self.add_(layer, module, hidden.detach(), index, weights.detach())

        return hook

    @torch.no_grad()
    def add_(self, layer: int, experts, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
        """Fold one batch in: hidden (T, H), index and weights (T, k) as the router chose them."""
        routed = torch.ones_like(index, dtype=torch.bool) if self.real is None else self.real.to(index.device)[:, None]
        routed = routed.expand_as(index)
        for e in index[routed].unique().tolist():
            token, slot = torch.nonzero((index == e) & routed, as_tuple=True)
            gate, up = F.linear(hidden[token], experts.gate_up_proj[e]).chunk(2, dim=-1)
            act = experts.act_fn(gate) * up  # (n, ffn)
            out = F.linear(act, experts.down_proj[e])  # (n, H)
            norm = torch.linalg.vector_norm(out, dim=-1, dtype=torch.float32)
            self.tokens[layer, e] += len(token)
            self.mass[layer, e] += (weights[token, slot].float() * norm).sum().to(self.mass.device)
            self.neurons[layer, e] += act.abs().sum(0, dtype=torch.float32).to(self.neurons.device)

    def neuron_scores(self) -> torch.Tensor:
        """(layers, experts, ffn) float32 on CPU: mean |act| of each expert's neurons over its tokens."""
        return (self.neurons / self.tokens.clamp(min=1.0)[..., None]).cpu()

    def metrics(self) -> dict[str, torch.Tensor]:
        """Expert metric -> (layers, experts) float32 on CPU: "reap_sum", "reap" and "frequency"."""
        slots = self.tokens.sum(-1, keepdim=True).clamp(min=1.0)  # routed (token, expert) pairs per layer
        reap = self.mass / self.tokens.clamp(min=1.0)
        return {"reap_sum": (self.mass / slots).cpu(), "reap": reap.cpu(), "frequency": (self.tokens / slots).cpu()}
