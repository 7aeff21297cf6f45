"""Importance scores: one record per model, saved to disk and reused for any number of pruning targets."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from compactlm.errors import CompactLMError


@dataclass(frozen=True)
class Scores:
    """Higher means more important. Width scores are float32; layer metrics map a name to (layers,), expert
    metrics (mixtures of experts) a name to (layers, experts)."""

    hidden: torch.Tensor  # (hidden,) one global ranking of residual channels
    heads: torch.Tensor  # (layers, heads) query heads, ranked within their layer
    ffn: torch.Tensor  # (layers, ffn) MLP neurons, ranked within their layer; MoE: (layers, experts, ffn)
    layers: dict[str, torch.Tensor] = field(default_factory=dict)  # metric -> (layers,)
    meta: dict[str, str] = field(default_factory=dict)  # method, aggregation, model, ...
    experts: dict[str, torch.Tensor] = field(default_factory=dict)  # metric -> (layers, experts)

    def check(self, dims, what: str) -> None:
        """One-line error naming `what` (e.g. the scores file) unless hidden, heads and ffn fit `dims` (a Dims)."""
        ffn = (dims.layers, dims.experts, dims.ffn) if dims.experts else (dims.layers, dims.ffn)
        want = {"hidden": (dims.hidden,), "heads": (dims.layers, dims.heads), "ffn": ffn}
        got = {"hidden": tuple(self.hidden.shape), "heads": tuple(self.heads.shape), "ffn": tuple(self.ffn.shape)}
        wrong = [f"{k} {got[k]} != {want[k]}" for k in want if got[k] != want[k]]
        if wrong:
            raise CompactLMError(f"{what} was computed for a different model shape ({', '.join(wrong)})")

    def save(self, path: str | Path) -> None:
        """Write scores as safetensors with the metadata in the header."""
        tensors = {"hidden": self.hidden, "heads": self.heads, "ffn": self.ffn}
        tensors |= {f"layers.{k}": v for k, v in self.layers.items()}
        tensors |= {f"experts.{k}": v for k, v in self.experts.items()}
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(path), metadata={"meta": json.dumps(self.meta, sort_keys=True)})

    @classmethod
    def load(cls, path: str | Path) -> "Scores":
        """Read scores written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise CompactLMError(f"scores file {path} does not exist")
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        except Exception as e:  # safetensors raises several types for a corrupt file
            raise CompactLMError(f"scores file {path} is corrupt: {str(e).splitlines()[0]}") from None
        group = lambda prefix: {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        return cls(tensors["hidden"], tensors["heads"], tensors["ffn"], group("layers."), meta, group("experts."))
