"""Depth importance (Minitron: P1, arXiv 2407.14679; P2, arXiv 2408.11796): LM loss when layers are skipped, and Block Importance (cosine).

Every metric returns a (layers,)-like float32 tensor on CPU, higher = more important. A layer is skipped by
a forward hook on the decoder layer that replaces its output hidden states by its input; hooks are always
removed. Batches are materialised once (each metric runs several passes over them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from compactlm.errors import CompactLMError
from compactlm.models.family import family_of, get_module
from compactlm.models.layerwise import Layerwise, decoder_passes, model_inputs, skeleton

log = logging.getLogger(__name__)

Batches = Iterable[dict[str, torch.Tensor]]


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer was called with (positional or keyword)."""
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output) -> torch.Tensor:
    """The hidden states a decoder layer returned: a tensor in transformers 5.x, a tuple in older blocks."""
    return output[0] if isinstance(output, tuple) else output


def _skip_hook(module, args, kwargs, output):
    """Replace a decoder layer's output hidden states by its input (keeps a tuple output's other fields)."""
    hidden = _hidden_in(args, kwargs)
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


@contextlib.contextmanager
def skip_layers(model, layers: Iterable[int]) -> Iterator[None]:
    """Within the block, the given decoder layers pass their input through unchanged."""
    modules = get_module(model, family_of(model).layers_path)
    handles = []
    try:
        for i in layers:
            handles.append(modules[i].register_forward_hook(_skip_hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


LAYERWISE_METRICS = ("block_importance", "magnitude", "random")  # depth metrics a `Layerwise` computes


def check_layerwise(model, metric: str) -> None:
    """LM-loss metrics run the whole model once per skipped layer or block: a `Layerwise` cannot."""
    if isinstance(model, Layerwise) and metric not in LAYERWISE_METRICS:
        raise CompactLMError(f"layer metric '{metric}' needs the whole model in memory; with memory_gb set "
                             f"use block_importance (importance.layer_metrics, target.layer_metric)")


def lm_loss(model, batches: Batches) -> float:
    """Mean next-token cross-entropy (nats) over non-padding targets: evaluate.perplexity's loss, so the
    logits are computed in token chunks and never exist in full for the whole batch."""
    from compactlm.metrics import perplexity

    return perplexity(model, batches)["loss"]


def _num_layers(model) -> int:
    return family_of(skeleton(model)).dims(skeleton(model).config).layers


def lm_loss_importance(model, batches: Batches) -> torch.Tensor:
    """(layers,) float32: LM loss with that layer alone skipped minus the loss of the full model."""
    check_layerwise(model, "lm_loss")
    batches = list(batches)
    baseline = lm_loss(model, batches)
    out = []
    for i in range(_num_layers(model)):
        with skip_layers(model, [i]):
            out.append(lm_loss(model, batches) - baseline)
    return torch.tensor(out, dtype=torch.float32)


def contiguous_block_losses(model, batches: Batches, n: int) -> torch.Tensor:
    """(layers - n + 1,) float32: LM loss with layers s..s+n-1 skipped, for every start s."""
    check_layerwise(model, f"contiguous_{n}")
    layers = _num_layers(model)
    if not 1 <= n <= layers:
        raise CompactLMError(f"block size n={n} must be between 1 and the model's {layers} layers")
    batches = list(batches)
    out = []
    for start in range(layers - n + 1):
        with skip_layers(model, range(start, start + n)):
            out.append(lm_loss(model, batches))
    return torch.tensor(out, dtype=torch.float32)


class _CosineTracker:
    """Hook state: inputs of the last n layers and float32 sums of masked cos(x_i, x_{i+n}) per start i."""

    def __init__(self, layers: int, n: int, device: torch.device):
        self.n = n
        self.inputs: dict[int, torch.Tensor] = {}
        self.sums = torch.zeros(layers - n + 1, dtype=torch.float32, device=device)
        self.mask: torch.Tensor | None = None

    def pre(self, i: int):
        def hook(module, args, kwargs) -> None:
            self.inputs[i] = _hidden_in(args, kwargs)

        return hook

    def post(self, j: int):
        def hook(module, args, kwargs, output) -> None:
            start = j - self.n + 1
            if start < 0:
                return
            x, y = self.inputs.pop(start), _hidden_out(output)
            cos = F.cosine_similarity(x.float(), y.float(), dim=-1)  # (B, S)
            self.sums[start] += (cos * self.mask.to(cos.device)).sum().to(self.sums.device)

        return hook


def block_importance(model, batches: Batches, n: int = 1) -> torch.Tensor:
    """(layers - n + 1,) float32 BI: 1 - mean over real tokens of cos(input of layer i, output of i+n-1).

    `model`: a loaded model, or a `Layerwise` for n = 1 (one layer's input and output at a time)."""
    net = skeleton(model)
    layers = _num_layers(net)
    if not 1 <= n <= layers:
        raise CompactLMError(f"block size n={n} must be between 1 and the model's {layers} layers")
    if n > 1 and isinstance(model, Layerwise):
        raise CompactLMError(f"block_importance over blocks of n={n} layers needs the whole model in memory")
    batches = list(batches)
    modules = get_module(net, family_of(net).layers_path)
    tracker = _CosineTracker(layers, n, get_module(net, family_of(net).embed_path).weight.device)
    tokens = sum(float(model_inputs(b, torch.device("cpu"))["attention_mask"].sum()) for b in batches)
    if tokens == 0:
        raise CompactLMError("block_importance: the batches hold no non-padding token")

    def on_batch(b: int, inputs: dict) -> None:
        tracker.mask = inputs["attention_mask"].float()
        tracker.inputs.clear()

    handles = []
    try:
        for i in range(layers):
            handles.append(modules[i].register_forward_pre_hook(tracker.pre(i), with_kwargs=True))
            handles.append(modules[i].register_forward_hook(tracker.post(i), with_kwargs=True))
        decoder_passes(model, batches, on_batch, desc="block importance")
    finally:
        for handle in handles:
            handle.remove()
    return (1.0 - tracker.sums / tokens).float().cpu()


LAYER_METRICS = {"lm_loss": lm_loss_importance, "block_importance": block_importance}


def layer_metrics(model, batches: Batches, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The named depth metrics ("lm_loss", "block_importance"), each (layers,) float32."""
    unknown = [m for m in names if m not in LAYER_METRICS]
    if unknown:
        raise CompactLMError(f"unknown layer metric '{unknown[0]}' (choose from {', '.join(LAYER_METRICS)})")
    batches = list(batches)
    return {name: LAYER_METRICS[name](model, batches) for name in names}


def with_depth_metrics(model, batches: Batches, scores, names: Sequence[str]):
    """`scores` (a Scores) plus every depth metric in `names` it lacks: "lm_loss", "block_importance" or
    "contiguous_<n>" (LM loss with each block of n layers skipped)."""

    missing = [n for n in names if n not in scores.layers]
    if not missing:
        return scores
    batches = list(batches)
    added = {}
    for name in missing:
        if name.startswith("contiguous_"):
            added[name] = contiguous_block_losses(model, batches, int(name.split("_")[1]))
        else:
            added |= layer_metrics(model, batches, [name])
    return dataclasses.replace(scores, layers=scores.layers | added)
