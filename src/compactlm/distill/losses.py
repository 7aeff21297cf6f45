"""Distillation losses as pure functions (Minitron: P1, arXiv 2407.14679; P2, arXiv 2408.11796).

`kd_loss` is the memory-efficient logit loss: it never materialises full-size logits. It walks the tokens in
chunks, computes student and teacher logits of one chunk from the final hidden states and the lm_head
weights, adds the chunk's loss, and computes the chunk's gradient wrt the student hidden states and head
right away (as Liger-Kernel's fused linear cross-entropy does). Backward only scales the stored gradients.

Definitions (T = temperature, p = softmax(teacher_logits / T), q = softmax(student_logits / T)):

    kl[i] = T^2 * sum_v p[i,v] * (log p[i,v] - log q[i,v])   # forward KL(teacher || student), Hinton's T^2
    ce[i] = -log softmax(student_logits[i])[labels[i]]        # at temperature 1, not T
    loss  = sum_{mask[i]=1} kl[i] / n_mask + ce_weight * sum_{mask[i]=1, labels[i]!=-100} ce[i] / n_ce

The T^2 factor (Hinton et al. 2015) keeps the soft-target gradient, T * (q - p) wrt the student logits,
comparable in size across temperatures (q - p shrinks about as 1/T^2 at high T).

`divergence` replaces the forward KL in kl[i] by another divergence D(p, q), with the same T^2 (a = `skew`):

    forward_kl       KL(p || q)                                   mean-seeking (Hinton; Minitron's choice)
    reverse_kl       KL(q || p)                                   mode-seeking (MiniLLM, Gu et al. 2024)
    skew_kl          KL(p || a p + (1 - a) q)                     DistiLLM's SKL (Ko et al. 2024, a = 0.1)
    skew_reverse_kl  KL(q || (1 - a) p + a q)                     DistiLLM's SRKL
    jsd              a KL(p || m) + (1 - a) KL(q || m), m = a p + (1 - a) q   GKD's JSD(beta = a) (Agarwal et al. 2024)

Each gradient wrt z = student logits / T has the closed form q * (f - sum_v q f) with f = dD/dq (forward KL:
q - p), computed chunk by chunk like the forward KL's; the mixtures m are formed in log space (logaddexp), so
tokens both models give ~0 probability never produce 0 * log 0.
`labels` are already aligned with the positions (labels[i] is the token that position i predicts, i.e.
shifted by the caller), -100 ignored. Token positions with mask == 0 contribute nothing to loss or grads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from compactlm.errors import CompactLMError
from compactlm.models.head import head_logits, log_softmax_

IGNORE_INDEX = -100

__all__ = [
    "DIVERGENCES", "IGNORE_INDEX", "cosine_loss", "default_layer_map", "dynamic_alpha", "expert_slots", "head_logits",
    "kd_loss", "kd_loss_reference", "load_balancing_loss", "teacher_sampled", "teacher_topk", "topk_kd_loss",
    "topk_kd_loss_reference",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, else the input dtype (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _row_sums(x: Tensor) -> Tensor:
    """(c, V) -> (c,) float64 sums of each row. One float32 dot over c x V elements drifts with its length (128 x
    49,152: 1.7e-4 relative); a row's own (pairwise) sum stays at float32 accuracy, and the rows add in float64."""
    return x.sum(-1).double()


def _cap_slope(hidden: Tensor, head: Tensor, bias: Tensor | None, cap: float, dtype: torch.dtype) -> Tensor:
    """d capped / d raw logits, 1 - tanh(raw / cap)^2 (c, V): turns a gradient wrt capped logits into one wrt
    the raw logits that the head computes."""
    t = F.linear(hidden, head, bias).to(dtype).div_(cap).tanh_()
    return t.mul_(t).neg_().add_(1.0)


def _log_softmax(
    hidden: Tensor, head: Tensor, bias: Tensor | None, cap: float | None, temperature: float, dtype: torch.dtype,
) -> Tensor:
    """log_softmax(head_logits(hidden) / T) -> (c, V); matmul in the inputs' dtype, the rest in dtype."""
    logits = head_logits(hidden, head, bias, cap, dtype)  # (c, V), as the model computes them
    return log_softmax_(logits.div_(temperature) if temperature != 1.0 else logits)


def _forward_kl(log_p: Tensor, log_q: Tensor, a: float, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """sum over the chunk of KL(p || q) (float64) and its gradient wrt z, q - p (c, V), written into log_p's
    buffer: three (c, V) buffers in all."""
    p = log_p.exp()  # (c, V)
    kl = _row_sums(log_p.sub_(log_q).mul_(p)).sum()  # sum p * (log p - log q), in place: no new buffer
    return kl, torch.exp(log_q, out=log_p).sub_(p) if need_grad else None


def _softmax_grad(q: Tensor, f: Tensor) -> Tensor:
    """d D / d z = q * (f - sum_v q f) (c, V) from f = d D / d q (c, V): the softmax's Jacobian. Overwrites f."""
    return f.sub_((q * f).sum(-1, keepdim=True)).mul_(q)


def _reverse_kl(log_p: Tensor, log_q: Tensor, a: float, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """KL(q || p): sum q (log q - log p); f = log q - log p (+ 1, which the Jacobian cancels)."""
    q = log_q.exp()
    f = log_q - log_p  # (c, V)
    loss = _row_sums(q * f).sum()
    return loss, _softmax_grad(q, f) if need_grad else None


def _mixture(log_p: Tensor, log_q: Tensor, a: float) -> Tensor:
    """log(a p + (1 - a) q) (c, V), in log space."""
    return torch.logaddexp(log_p + math.log(a), log_q + math.log1p(-a))


def _skew_kl(log_p: Tensor, log_q: Tensor, a: float, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """KL(p || m), m = a p + (1 - a) q: f = -(1 - a) p / m."""
    log_m = _mixture(log_p, log_q, a)
    loss = _row_sums(log_p.exp() * (log_p - log_m)).sum()
    if not need_grad:
        return loss, None
    return loss, _softmax_grad(log_q.exp(), log_p.sub_(log_m).exp_().mul_(a - 1.0))


def _skew_reverse_kl(log_p: Tensor, log_q: Tensor, a: float, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """KL(q || m), m = (1 - a) p + a q: f = log q - log m + 1 - a q / m (the 1 cancels)."""
    log_m = _mixture(log_q, log_p, a)
    q = log_q.exp()
    f = log_q - log_m  # (c, V)
    loss = _row_sums(q * f).sum()
    if not need_grad:
        return loss, None
    return loss, _softmax_grad(q, f.sub_(f.exp().mul_(a)))


def _jsd(log_p: Tensor, log_q: Tensor, a: float, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """a KL(p || m) + (1 - a) KL(q || m), m = a p + (1 - a) q: f = (1 - a)(log q - log m)."""
    log_m = _mixture(log_p, log_q, a)
    q = log_q.exp()
    f = log_q - log_m  # (c, V)
    loss = _row_sums(log_p.exp() * (log_p - log_m)).sum() * a + _row_sums(q * f).sum() * (1.0 - a)
    return loss, _softmax_grad(q, f.mul_(1.0 - a)) if need_grad else None


# divergence name -> (log p, log q (c, V) at T, a, need_grad) -> (sum over the chunk, d / d (logits / T) or None)
DIVERGENCES = {"forward_kl": _forward_kl, "reverse_kl": _reverse_kl, "skew_kl": _skew_kl,
               "skew_reverse_kl": _skew_reverse_kl, "jsd": _jsd}


def _chunk_loss_and_grad(
    hs_c: Tensor, ht_c: Tensor, labels: Tensor | None, student: tuple, teacher: tuple, temperature: float,
    kl_scale: float, ce_scale: float, need_grad: bool, divergence: tuple[str, float] = ("forward_kl", 0.0),
) -> tuple[Tensor, Tensor | None, float]:
    """Loss sum of one chunk (float64) and g, scale with d loss / d student_logits = g * scale (c, V) (capped
    logits, when capped: `_chunked_forward` carries g through the cap). `divergence`: (name, a).

    The forward KL keeps at most three (c, V) buffers alive at once, the others five; student/teacher are
    (head, bias, cap) triples.
    """
    dtype = _compute_dtype(hs_c.dtype)
    log_q = _log_softmax(hs_c, *student, temperature, dtype)  # (c, V) log q_T
    log_p = _log_softmax(ht_c, *teacher, temperature, dtype)  # (c, V) log p
    name, a = divergence
    div, grad = DIVERGENCES[name](log_p, log_q, a, need_grad)  # grad wrt logits / T
    del log_p
    loss = div * (kl_scale * temperature**2)
    if ce_scale:
        log_q1 = log_q if temperature == 1.0 else _log_softmax(hs_c, *student, 1.0, dtype)  # (c, V)
        valid = labels != IGNORE_INDEX  # (c,)
        rows = valid.nonzero().squeeze(1)
        loss = loss - log_q1[rows, labels[rows]].double().sum() * ce_scale
    if not need_grad:
        return loss, None, 1.0
    coef = kl_scale * temperature  # d(kl_scale * T^2 * D)/ds = coef * dD/dz
    if not ce_scale:
        return loss, grad, coef
    w_ce = valid.to(dtype).unsqueeze(1) * (ce_scale / coef)  # (c, 1) CE weight in units of coef
    grad.add_(log_q1.exp_().mul_(w_ce))  # + w_ce * softmax(s)
    grad[rows, labels[rows]] -= ce_scale / coef  # d CE / ds = softmax(s) - onehot
    return loss, grad, coef


def _chunk_topk_loss_and_grad(
    hs_c: Tensor, logp_c: Tensor, ids_c: Tensor, student: tuple, temperature: float, kl_scale: float,
    need_grad: bool,
) -> tuple[Tensor, Tensor | None, float]:
    """`_chunk_loss_and_grad` against a sparse teacher: its top-K log-probabilities `logp_c` (c, K) at ids
    `ids_c` (c, K) and, implicitly, the tail mass r = 1 - sum(p_K) on every other token.

    The loss is the exact KL between the two distributions coarsened to K + 1 outcomes (the top-K tokens and
    "any other token"): sum_K p (log p - log q) + r (log r - log q_tail), q_tail = 1 - sum(q_K). It is a lower
    bound of the full KL (coarsening never increases it) and equals it when the teacher's tail is empty. Its
    gradient wrt the student's logits / T is q - p~, where p~ is p on the top K and r * q / q_tail elsewhere:
    the tail mass spread over the other tokens in the student's own proportions."""
    dtype = _compute_dtype(hs_c.dtype)
    log_q = _log_softmax(hs_c, *student, temperature, dtype)  # (c, V) log q_T
    logp = logp_c.to(dtype)  # (c, K)
    p = logp.exp()  # (c, K); 0 at the padding of sampled targets (`teacher_sampled`), whose ids may repeat
    kept = p > 0
    log_r = torch.log1p(-p.sum(-1).clamp(max=1.0))  # (c,) teacher tail, -inf when the top K hold everything
    q_k = log_q.gather(1, ids_c)  # (c, K)
    log_q_tail = torch.log1p(-(q_k.exp() * kept).sum(-1).clamp(max=1.0 - 1e-7))  # (c,)
    r = log_r.exp()
    tail = torch.where(r > 0, r * (log_r - log_q_tail), torch.zeros_like(r))  # 0 * log 0 = 0
    kl = _row_sums(p * (logp - q_k)).sum() + tail.double().sum()
    loss = kl * (kl_scale * temperature**2)
    if not need_grad:
        return loss, None, 1.0
    q = log_q.exp_()  # (c, V)
    target = q * (r / log_q_tail.exp()).unsqueeze(1)  # (c, V) p~ off the kept tokens: r * q / q_tail
    # p~ on the kept tokens: p. Added as differences, so that a padding entry (p = 0) repeating a kept id adds 0
    target.scatter_add_(1, ids_c, torch.where(kept, p - target.gather(1, ids_c), 0.0))
    return loss, q.sub_(target), kl_scale * temperature


class _ChunkedKD(torch.autograd.Function):
    """Forward computes loss and grads chunk by chunk; backward scales the stored grads by grad_output."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, rows, labels, temperature, ce_weight, chunk, caps,  # noqa: D102
                divergence):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_grad = need_h or need_w or need_b
        dtype = _compute_dtype(h_s.dtype)
        kl_scale = 1.0 / max(int(rows.numel()), 1)
        n_ce = int((labels.index_select(0, rows) != IGNORE_INDEX).sum()) if ce_weight else 0
        ce_scale = ce_weight / max(n_ce, 1) if ce_weight else 0.0

        def chunk_fn(idx: Tensor, hs_c: Tensor) -> tuple[Tensor, Tensor | None, float]:
            return _chunk_loss_and_grad(
                hs_c, h_t.index_select(0, idx), labels.index_select(0, idx) if ce_weight else None,
                (w_s, b_s, caps[0]), (w_t, b_t, caps[1]), temperature, kl_scale, ce_scale, need_grad, divergence)

        return _chunked_forward(ctx, h_s, w_s, b_s, caps[0], rows, chunk, dtype, chunk_fn)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        return (*_scaled_grads(ctx, grad_out), None, None, None, None, None, None, None, None, None, None)


class _ChunkedTopKKD(torch.autograd.Function):
    """`_ChunkedKD` against a sparse teacher (top-K log-probabilities and their ids per position)."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, logp, ids, rows, temperature, chunk, cap):  # noqa: D102
        need_grad = any(ctx.needs_input_grad[:3])
        kl_scale = 1.0 / max(int(rows.numel()), 1)

        def chunk_fn(idx: Tensor, hs_c: Tensor) -> tuple[Tensor, Tensor | None, float]:
            return _chunk_topk_loss_and_grad(hs_c, logp.index_select(0, idx), ids.index_select(0, idx),
                                             (w_s, b_s, cap), temperature, kl_scale, need_grad)

        return _chunked_forward(ctx, h_s, w_s, b_s, cap, rows, chunk, _compute_dtype(h_s.dtype), chunk_fn)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        return (*_scaled_grads(ctx, grad_out), None, None, None, None, None, None)


def _chunked_forward(ctx, h_s: Tensor, w_s: Tensor, b_s: Tensor | None, cap: float | None, rows: Tensor, chunk: int,
                     dtype: torch.dtype, chunk_fn) -> Tensor:
    """The loss summed over chunks of `rows` (chunk_fn(idx, hs_c) -> (loss part, g, scale)), with the student's
    grads accumulated chunk by chunk and saved on `ctx` for backward. A capped head's g (wrt the capped
    logits) is carried through the cap here."""
    loss = torch.zeros((), dtype=torch.float64, device=h_s.device)
    grad_h, grad_w, grad_b = _grad_buffers(ctx, h_s, w_s, b_s)
    for start in range(0, rows.numel(), chunk):
        idx = rows[start:start + chunk]  # (c,) token positions
        hs_c = h_s.index_select(0, idx)  # (c, H_s)
        part, g, scale = chunk_fn(idx, hs_c)
        loss += part
        if g is not None and cap is not None:
            g = g.mul_(_cap_slope(hs_c, w_s, b_s, cap, g.dtype))
        if g is not None:
            _accumulate(g.to(h_s.dtype), scale, idx, hs_c, w_s, grad_h, grad_w, grad_b)
        del g
    _save_grads(ctx, w_s, b_s, grad_h, grad_w, grad_b)
    return loss.to(dtype)


def _grad_buffers(ctx, h_s: Tensor, w_s: Tensor, b_s: Tensor | None) -> tuple:
    """Zeroed (grad_h, grad_w, grad_b) for the student inputs that need one, else None: grad_h in the input
    dtype, the head and bias accumulators in float32 (or float64)."""
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    dtype = _compute_dtype(h_s.dtype)
    return (torch.zeros_like(h_s) if need_h else None,  # (N, H_s)
            torch.zeros(w_s.shape, dtype=dtype, device=w_s.device) if need_w else None,  # (V, H_s)
            torch.zeros(b_s.shape, dtype=dtype, device=b_s.device) if need_b else None)


def _accumulate(g: Tensor, scale: float, idx: Tensor, hs_c: Tensor, w_s: Tensor, grad_h, grad_w, grad_b) -> None:
    """Add one chunk's d loss / d logits = g * scale (c, V) to the student's hidden, head and bias grads."""
    if grad_h is not None:
        grad_h.index_copy_(0, idx, torch.mm(g, w_s).mul_(scale))  # (c, H_s)
    if grad_w is not None and grad_w.dtype == g.dtype:
        grad_w.addmm_(g.t(), hs_c, alpha=scale)  # (V, H_s)
    elif grad_w is not None:
        grad_w.add_(torch.mm(g.t(), hs_c), alpha=scale)  # bf16 matmul, float32 accumulation
    if grad_b is not None:
        grad_b.add_(g.sum(0), alpha=scale)


def _save_grads(ctx, w_s: Tensor, b_s: Tensor | None, grad_h, grad_w, grad_b) -> None:
    grad_w = grad_w.to(w_s.dtype) if grad_w is not None else None
    grad_b = grad_b.to(b_s.dtype) if grad_b is not None else None
    ctx.save_for_backward(grad_h, grad_w, grad_b)


def _scaled_grads(ctx, grad_out: Tensor) -> list:
    grads = ctx.saved_tensors
    if not torch.equal(grad_out, torch.ones_like(grad_out)):
        grads = [None if g is None else g * grad_out.to(g.dtype) for g in grads]
    return list(grads)


def _value_only(*student: Tensor | None) -> tuple:
    """The student's inputs, detached under `torch.no_grad()`: the chunked losses then compute the value alone
    (an autograd.Function sees requires_grad, not the grad mode, and would build gradients nobody reads)."""
    return student if torch.is_grad_enabled() else tuple(None if t is None else t.detach() for t in student)


def _flat(x: Tensor, width: int | None) -> Tensor:
    """Flatten leading dims: (..., W) -> (N, W), or (...) -> (N,) when width is None."""
    return x.reshape(-1) if width is None else x.reshape(-1, width)


def kd_loss(
    student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor, teacher_head: Tensor, mask: Tensor,
    *, student_bias: Tensor | None = None, teacher_bias: Tensor | None = None, temperature: float = 1.0,
    ce_weight: float = 0.0, labels: Tensor | None = None, chunk_tokens: int = 256,
    student_cap: float | None = None, teacher_cap: float | None = None, divergence: str = "forward_kl",
    skew: float = 0.1,
) -> Tensor:
    """Chunked KL(teacher||student)*T^2 (+ ce_weight*CE): hidden (..., H_s)/(..., H_t) after the final norm,
    heads (V, H_s)/(V, H_t), mask and labels (...); scalar in float32 (float64 for float64 inputs). Each model's
    logits are soft-capped by its cap, as the model computes them (`head_logits`).

    Peak extra memory is a few (chunk_tokens, V) float32 buffers plus one (V, H_s) float32 gradient
    accumulator. Teacher inputs are constants (no grad). A tied student head receives its gradient through
    the Parameter passed as `student_head`. Matmuls run in the inputs' dtype (bf16 on GPU uses tensor
    cores); softmax, KL, CE and the head-gradient accumulation run in float32; grads come back in the
    dtype of each input. mask: nonzero = real token, 0 = padding. labels: next-token ids aligned with the
    positions (already shifted), IGNORE_INDEX skipped; CE averages over real tokens with a label.
    `divergence` (a name in DIVERGENCES, see the module's docstring) replaces the forward KL; `skew` is its a.
    """
    _check_divergence(divergence, skew)
    hs, ht = student_hidden.shape[-1], teacher_hidden.shape[-1]
    if student_head.shape[0] != teacher_head.shape[0]:
        raise CompactLMError(
            f"kd_loss: student vocab {student_head.shape[0]} != teacher vocab {teacher_head.shape[0]}")
    if student_head.shape[1] != hs or teacher_head.shape[1] != ht:
        raise CompactLMError("kd_loss: lm_head width does not match the hidden states' last dim")
    if temperature <= 0 or chunk_tokens < 1:
        raise CompactLMError(
            f"kd_loss: need temperature > 0 and chunk_tokens >= 1, got {temperature} and {chunk_tokens}")
    if ce_weight and labels is None:
        raise CompactLMError("kd_loss: ce_weight > 0 needs labels")
    h_s, h_t, m = _flat(student_hidden, hs), _flat(teacher_hidden, ht).detach(), _flat(mask, None)
    if not (h_s.shape[0] == h_t.shape[0] == m.shape[0]):
        raise CompactLMError("kd_loss: student hidden, teacher hidden and mask cover different token counts")
    rows = m.nonzero().squeeze(1)  # (n,) positions with mask != 0
    lab = _flat(labels, None).to(torch.long) if labels is not None else torch.empty(0, dtype=torch.long)
    if ce_weight and lab.shape[0] != h_s.shape[0]:
        raise CompactLMError("kd_loss: labels cover a different token count than the hidden states")
    lab = lab.to(h_s.device)
    tb = teacher_bias.detach() if teacher_bias is not None else None
    h_s, student_head, student_bias = _value_only(h_s, student_head, student_bias)
    return _ChunkedKD.apply(h_s, student_head, student_bias, h_t, teacher_head.detach(), tb, rows, lab,
                            float(temperature), float(ce_weight), int(chunk_tokens), (student_cap, teacher_cap),
                            (divergence, float(skew)))


def _check_divergence(divergence: str, skew: float) -> None:
    if divergence not in DIVERGENCES:
        raise CompactLMError(f"kd_loss: unknown divergence {divergence!r} (one of {', '.join(DIVERGENCES)})")
    if divergence != "forward_kl" and not 0 < skew < 1:
        raise CompactLMError(f"kd_loss: {divergence} needs 0 < skew < 1, got {skew}")


def teacher_topk(logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """A teacher's sparse targets from its logits (..., V): the top-k log-probabilities at `temperature` as
    float16 and their token ids as int32, each (..., k). What a teacher logit cache stores per position."""
    logp = log_softmax_(logits.float() / temperature)
    values, ids = logp.topk(k, dim=-1)
    return values.to(torch.float16), ids.to(torch.int32)


def teacher_sampled(logits: Tensor, k: int, temperature: float = 1.0,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Sparse targets drawn from the teacher instead of its top k (random-sampling KD, Anshumann et al. 2025):
    k tokens drawn with replacement from softmax(logits / T), kept as each distinct token's share of the draws,
    log(count / k), as float16, at its id (int32), each (..., k). Distilling from these shares is distilling from
    an unbiased estimate of the teacher's distribution: the KL's gradient, q - p, is right on average, where
    the top k leave the tail's shape to the student. Slots beyond the distinct tokens repeat a drawn id with
    log-probability float16's lowest (-65504, probability exactly 0), which the losses skip."""
    probs = torch.softmax(logits.float().reshape(-1, logits.shape[-1]) / temperature, dim=-1)  # (N, V)
    ids = torch.multinomial(probs, k, replacement=True, generator=generator).sort(-1).values  # (N, k)
    del probs
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]  # (N, k) the first slot of each distinct token
    counts = (ids.unsqueeze(-1) == ids.unsqueeze(-2)).sum(-1)  # (N, k) draws of each slot's token
    logp = torch.where(first, (counts.float() / k).log(), torch.finfo(torch.float16).min)
    shape = (*logits.shape[:-1], k)
    return logp.to(torch.float16).reshape(shape), ids.to(torch.int32).reshape(shape)


def topk_kd_loss(
    student_hidden: Tensor, student_head: Tensor, teacher_logprobs: Tensor, teacher_ids: Tensor, mask: Tensor,
    *, student_bias: Tensor | None = None, temperature: float = 1.0, chunk_tokens: int = 256,
    student_cap: float | None = None,
) -> Tensor:
    """`kd_loss` against a sparse teacher: its top-K log-probabilities (..., K) at `temperature` and their ids
    (..., K) per position, e.g. from `teacher_topk`; the rest of the teacher's mass is one tail outcome (see
    `_chunk_topk_loss_and_grad`). Chunked, memory, dtypes and `student_cap` as `kd_loss`; KL only (no CE mix)."""
    hs, k = student_hidden.shape[-1], teacher_logprobs.shape[-1]
    if teacher_ids.shape != teacher_logprobs.shape:
        raise CompactLMError("topk_kd_loss: teacher ids and log-probabilities differ in shape")
    if student_head.shape[1] != hs:
        raise CompactLMError("topk_kd_loss: lm_head width does not match the hidden states' last dim")
    if temperature <= 0 or chunk_tokens < 1 or not 0 < k <= student_head.shape[0]:
        raise CompactLMError(f"topk_kd_loss: need temperature > 0, chunk_tokens >= 1 and 0 < K <= vocab, got "
                             f"{temperature}, {chunk_tokens} and {k}")
    h_s, m = _flat(student_hidden, hs), _flat(mask, None)
    logp, ids = _flat(teacher_logprobs, k).detach(), _flat(teacher_ids, k).to(torch.long)
    if not (h_s.shape[0] == logp.shape[0] == m.shape[0]):
        raise CompactLMError("topk_kd_loss: student hidden, teacher targets and mask cover different token counts")
    rows = m.nonzero().squeeze(1)  # (n,) positions with mask != 0
    h_s, student_head, student_bias = _value_only(h_s, student_head, student_bias)
    return _ChunkedTopKKD.apply(h_s, student_head, student_bias, logp.to(h_s.device), ids.to(h_s.device), rows,
                                float(temperature), int(chunk_tokens), student_cap)


def topk_kd_loss_reference(student_logits: Tensor, teacher_logprobs: Tensor, teacher_ids: Tensor, mask: Tensor,
                           temperature: float = 1.0) -> Tensor:
    """Plain autograd `topk_kd_loss` on full student logits (..., V) (tests, benchmark); scalar."""
    v, k = student_logits.shape[-1], teacher_logprobs.shape[-1]
    log_q = F.log_softmax(student_logits.reshape(-1, v).to(_compute_dtype(student_logits.dtype)) / temperature, -1)
    logp = teacher_logprobs.reshape(-1, k).to(log_q.dtype)
    q_k = log_q.gather(1, teacher_ids.reshape(-1, k).long())
    r = (1 - logp.exp().sum(-1)).clamp(min=0)
    q_tail = (1 - (q_k.exp() * (logp.exp() > 0)).sum(-1)).clamp(min=1e-7)  # over the kept (p > 0) tokens
    tail = torch.where(r > 0, r * (r.clamp(min=1e-30).log() - q_tail.log()), torch.zeros_like(r))
    kl = (logp.exp() * (logp - q_k)).sum(-1) + tail  # (N,)
    m = mask.reshape(-1).to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1) * temperature**2


def _divergence_reference(log_p: Tensor, log_q: Tensor, divergence: str, a: float) -> Tensor:
    """Each row's divergence (N,) from log-probabilities (N, V), by the plain formulas in probability space."""
    p, q = log_p.exp(), log_q.exp()
    kl = lambda x, log_x, y: (x * (log_x - y.log())).sum(-1)  # noqa: E731  KL(x || y), y a mixture
    if divergence == "forward_kl":
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    if divergence == "reverse_kl":
        return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    if divergence == "skew_kl":
        return kl(p, log_p, a * p + (1 - a) * q)
    if divergence == "skew_reverse_kl":
        return kl(q, log_q, (1 - a) * p + a * q)
    m = a * p + (1 - a) * q  # jsd
    return a * kl(p, log_p, m) + (1 - a) * kl(q, log_q, m)


def kd_loss_reference(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0,
    ce_weight: float = 0.0, labels: Tensor | None = None, divergence: str = "forward_kl", skew: float = 0.1,
) -> Tensor:
    """Plain full-logit `kd_loss` (tests, benchmark): logits (..., V), mask and labels (...); scalar."""
    _check_divergence(divergence, skew)
    v = student_logits.shape[-1]
    dtype = _compute_dtype(student_logits.dtype)
    s, t = student_logits.reshape(-1, v).to(dtype), teacher_logits.reshape(-1, v).to(dtype)
    m = mask.reshape(-1).to(s.dtype)
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    kl = _divergence_reference(log_p, log_q, divergence, skew)  # (N,)
    loss = (kl * m).sum() / m.sum().clamp_min(1) * temperature**2
    if ce_weight:
        lab = labels.reshape(-1).masked_fill(m == 0, IGNORE_INDEX)
        ce = F.cross_entropy(s, lab, ignore_index=IGNORE_INDEX, reduction="sum")
        loss = loss + ce_weight * ce / (lab != IGNORE_INDEX).sum().clamp_min(1)
    return loss


def cosine_loss(student_states: Tensor, teacher_states: Tensor, mask: Tensor) -> Tensor:
    """Mean over mask==1 tokens of 1 - cos(s, t): states (..., H) at teacher width, mask (...); fp32."""
    cos = F.cosine_similarity(student_states.float(), teacher_states.float(), dim=-1, eps=1e-8)  # (...)
    m = mask.to(cos.dtype)
    return ((1.0 - cos) * m).sum() / m.sum().clamp_min(1)


def dynamic_alpha(logit_loss: Tensor, intermediate_loss: Tensor) -> Tensor:
    """alpha = L_logits / L_intermediate, detached; 0 when L_intermediate == 0 (then alpha*L_int stays 0)."""
    num, den = logit_loss.detach(), intermediate_loss.detach()
    positive = den > 0
    safe_den = torch.where(positive, den, torch.ones_like(den))
    return torch.where(positive, num / safe_den, torch.zeros_like(num))


def expert_slots(router_logits: Sequence[Tensor], top_k: int, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Routing slots per expert (E,) and routed rows (), float32 sums over every layer's non-padding tokens:
    router_logits per layer (B*S, E), mask (B, S). Each row fills top_k slots, so slots sum to top_k x rows."""
    weight = mask.reshape(-1).float().to(router_logits[0].device)  # (B*S,)
    slots = torch.zeros(router_logits[0].shape[-1], dtype=torch.float32, device=weight.device)
    for gate in router_logits:
        chosen = gate.float().topk(top_k, dim=-1).indices  # (B*S, k); softmax keeps the order
        slots.scatter_add_(0, chosen.reshape(-1), weight.repeat_interleave(top_k))
    return slots, weight.sum() * len(router_logits)


def load_balancing_loss(router_logits: Sequence[Tensor], top_k: int, mask: Tensor, load: Tensor | None = None) -> Tensor:
    """Switch Transformer's auxiliary loss as Mixtral's and Qwen3-MoE's ForCausalLM compute it in transformers:
    E x sum_e f_e P_e, f_e the share of routing slots that went to expert e (`expert_slots` / rows) and P_e its
    mean router probability, both over every layer's non-padding tokens. router_logits per layer (B*S, E), mask
    (B, S). `load` (E,): f of the whole global batch, when this micro-batch is only part of it. P is linear in the
    tokens, so micro-batch losses weighted by their tokens then add up to the global batch's loss exactly."""
    weight = mask.reshape(-1).float().to(router_logits[0].device)  # (B*S,)
    probs = sum((torch.softmax(gate.float(), dim=-1) * weight[:, None]).sum(0) for gate in router_logits)  # (E,)
    rows = weight.sum() * len(router_logits)
    if load is None:
        load = expert_slots(router_logits, top_k, mask)[0] / rows
    return probs.shape[0] * (load.to(probs) * probs / rows).sum()


def default_layer_map(
    student_layers: int, teacher_layers: int, pairs: Sequence[tuple[int, int]] | None = None,
) -> list[tuple[int, int]]:
    """(student, teacher) indices into HF `output_hidden_states`: [(L_s-2, L_t-2)] unless `pairs` is given.

    Index 0 is the embedding output and index i the output of block i counting from 1, so L-2 is the block
    two before the last. Explicit `pairs` (e.g. from YAML `[[0, 0], [10, 28]]`; (0, 0) is the
    embedding-output loss) are validated against 0 <= i <= layers - 1 and returned as tuples.
    """
    if pairs is None:
        if student_layers < 2 or teacher_layers < 2:
            raise CompactLMError(
                f"layer_map: need >= 2 layers, got student {student_layers}, teacher {teacher_layers}")
        return [(student_layers - 2, teacher_layers - 2)]
    out = []
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(i, int) for i in pair):
            raise CompactLMError(f"layer_map: pair {pair!r} is not two integers")
        s, t = pair
        if not (0 <= s < student_layers and 0 <= t < teacher_layers):
            raise CompactLMError(
                f"layer_map: pair {pair!r} out of range for {student_layers}/{teacher_layers} layers")
        out.append((s, t))
    return out
