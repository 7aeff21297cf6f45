"""The LM head as the model computes it, for the code that runs it on final hidden states itself (chunked losses,
evaluation, the teacher cache) instead of calling the model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def head_logits(hidden: Tensor, head: Tensor, bias: Tensor | None = None, cap: float | None = None,
                dtype: torch.dtype | None = None) -> Tensor:
    """The logits a model computes from its final hidden states (..., H): hidden @ head.T + bias, matmul in the
    inputs' dtype, then in `dtype` soft-capped to cap * tanh(logits / cap) when the family caps them (Gemma 2's
    final_logit_softcapping; `Family.logit_cap`)."""
    logits = F.linear(hidden, head, bias)
    logits = logits.to(dtype) if dtype is not None else logits
    return logits if cap is None else torch.tanh(logits / cap) * cap  # out of place: autograd may run through it


def log_softmax_(logits: Tensor) -> Tensor:
    """log_softmax over the last dim, in place (no autograd). Its normaliser is summed pairwise (`logsumexp`):
    torch's fused CPU kernel sums exp(x) in running float32 lanes, whose error grows with the vocabulary
    (2e-5 relative at 262,144, and every KL and CE value off by as much); this one stays at float32 accuracy."""
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))
