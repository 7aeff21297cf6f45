"""First-order Taylor importance (Molchanov et al., 2019) on activations: `importance.method=taylor`.

Removing a unit sets its activation a to zero; to first order the LM loss changes by -sum_t a_t * dL/da_t.
Per calibration sequence b and unit c:

    s[b, c] = | sum_t a[b, t, c] * g[b, t, c] |        (a head sums over its head_dim channels first;
                                                       a hidden channel over the outputs of every norm)
    score[c] = mean over sequences of s[b, c]

read at the same places as the activation score (input of the MLP down projection, input of the attention
output projection, output of every norm). It needs a backward pass through the whole model: memory as for one
training step without the weights' gradients or optimizer state (the activations of a batch are kept for the
backward), so it runs on a loaded model, not layer by layer under `memory_gb`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from compactlm.errors import CompactLMError
from compactlm.importance.scores import Scores
from compactlm.models.family import family_of, get_module
from compactlm.models.layerwise import Layerwise, model_inputs


class _Sums:
    """Per site, the running sum over sequences of |sum_t a * g|, float32."""

    def __init__(self, d, norms: int):
        self.dims = d
        self.hidden = torch.zeros(d.layers * norms, d.hidden)
        self.heads = torch.zeros(d.layers, d.heads)
        self.ffn = torch.zeros(d.layers, d.ffn)
        self.sequences = 0
        self.mask: Tensor | None = None

    def watch(self, a: Tensor, out: Tensor, per_head: bool) -> None:
        """Register a gradient hook on activation `a` (B, S, C) that adds its per-sequence term into `out`."""
        if not a.requires_grad:
            return
        mask = self.mask

        def on_grad(g: Tensor) -> None:
            prod = (a.detach().float() * g.float()) * mask[..., None]  # padding contributes nothing
            per_seq = prod.sum(1)  # (B, C)
            if per_head:
                per_seq = per_seq.view(per_seq.shape[0], self.dims.heads, -1).sum(-1)
            out.add_(per_seq.abs().sum(0).to(out.device))

        a.register_hook(on_grad)


def taylor_scores(model, batches: Iterable[dict[str, Tensor]], progress: bool = False) -> Scores:
    """Hidden (hidden,), heads (layers, heads), ffn (layers, ffn) float32 first-order Taylor scores from one
    forward and backward of the LM loss per calibration batch; the weights get no gradients."""
    from tqdm.auto import tqdm

    if isinstance(model, Layerwise):
        raise CompactLMError("importance.method=taylor needs gradients through the whole model: it cannot run "
                             "layer by layer (memory_gb); choose activation or output_aware")
    family = family_of(model)
    d = family.dims(model.config)
    sums = _Sums(d, len(family.norm_paths))
    layers = get_module(model, family.layers_path)
    embed = get_module(model, family.embed_path)
    device = embed.weight.device
    handles = [embed.register_forward_hook(lambda m, args, out: out.requires_grad_(True))]  # a graph without weight grads

    def pre(out: Tensor, per_head: bool):
        return lambda module, args: sums.watch(args[0], out, per_head)

    for i in range(d.layers):
        handles.append(get_module(layers[i], family.mlp_out_path).register_forward_pre_hook(pre(sums.ffn[i], False)))
        handles.append(get_module(layers[i], family.attn_out_path).register_forward_pre_hook(pre(sums.heads[i], True)))
        for j, path in enumerate(family.norm_paths):
            site = sums.hidden[i * len(family.norm_paths) + j]
            handles.append(get_module(layers[i], path).register_forward_hook(
                lambda m, args, out, site=site: sums.watch(out, site, False)))
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    try:
        model.requires_grad_(False)
        for batch in tqdm(list(batches), desc="taylor", unit="batch", disable=not progress):
            inputs = model_inputs(batch, device)
            sums.mask = inputs["attention_mask"].float()
            labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
            with torch.enable_grad():
                loss = model(**inputs, labels=labels, use_cache=False).loss
                loss.backward()
            sums.sequences += int((sums.mask.sum(1) > 0).sum())
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(grads[n])
        model.train(was_training)
    if sums.sequences == 0:
        raise CompactLMError("importance: the calibration batches hold no non-padding token")
    n = float(sums.sequences)
    return Scores(hidden=sums.hidden.sum(0) / n, heads=sums.heads / n, ffn=sums.ffn / n,
                  meta={"method": "taylor"})
