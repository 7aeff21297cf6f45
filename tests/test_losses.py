"""Invariants of the distillation losses: chunked == plain, KL(p,p)=0, padding contributes nothing."""

import pytest
import torch

from compactlm.distill.losses import (
    IGNORE_INDEX,
    cosine_loss,
    default_layer_map,
    dynamic_alpha,
    kd_loss,
    kd_loss_reference,
    teacher_sampled,
    teacher_topk,
    topk_kd_loss,
    topk_kd_loss_reference,
)
from compactlm.errors import CompactLMError

N, V, HS, HT = 23, 40, 6, 10


def _inputs(dtype=torch.float64, seed=0, n=N):
    """Student hidden/head (grad), teacher hidden/head, mask with padding, labels with -100."""
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, HS, generator=g, dtype=dtype).requires_grad_()
    w_s = torch.randn(V, HS, generator=g, dtype=dtype).requires_grad_()
    h_t = torch.randn(n, HT, generator=g, dtype=dtype)
    w_t = torch.randn(V, HT, generator=g, dtype=dtype)
    mask = (torch.rand(n, generator=g) > 0.3).long()
    labels = torch.randint(0, V, (n,), generator=g)
    labels[::4] = IGNORE_INDEX
    return h_s, w_s, h_t, w_t, mask, labels


def _reference(h_s, w_s, h_t, w_t, mask, **kw):
    return kd_loss_reference(h_s @ w_s.T, h_t @ w_t.T, mask, kw.get("temperature", 1.0),
                             kw.get("ce_weight", 0.0), kw.get("labels"))


def test_kl_of_identical_distributions_is_zero():
    logits = torch.randn(3, 5, V, dtype=torch.float64)
    mask = torch.ones(3, 5)
    assert kd_loss_reference(logits, logits, mask).abs() < 1e-12  # float64, one log_softmax both sides: exactly 0
    h_s, w_s, *_ = _inputs()
    loss = kd_loss(h_s, w_s, h_s.detach(), w_s.detach(), torch.ones(N), temperature=2.0, chunk_tokens=5)
    assert loss.abs() < 1e-12  # both logits from the same matmul on the same values: exactly 0, 1e-12 a margin


@pytest.mark.parametrize("chunk", [1, 4, 7, N, 1024])
@pytest.mark.parametrize("temperature,ce_weight", [(1.0, 0.0), (2.5, 0.0), (1.0, 0.7), (0.5, 0.3)])
def test_chunked_matches_reference_in_loss_and_grads(chunk, temperature, ce_weight):
    h_s, w_s, h_t, w_t, mask, labels = _inputs()
    kw = dict(temperature=temperature, ce_weight=ce_weight, labels=labels)
    loss = kd_loss(h_s, w_s, h_t, w_t, mask, chunk_tokens=chunk, **kw)
    grads = torch.autograd.grad(loss * 1.7, (h_s, w_s))  # grad_output != 1 exercises the backward scaling
    ref = _reference(h_s, w_s, h_t, w_t, mask, **kw)
    ref_grads = torch.autograd.grad(ref * 1.7, (h_s, w_s))
    # float64 (eps 2.2e-16): chunking only reorders the sums over <= 23 tokens; measured <= 1e-15 in loss and grads
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("divergence", ["reverse_kl", "skew_kl", "skew_reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature,ce_weight,skew", [(1.0, 0.0, 0.1), (2.0, 0.0, 0.5), (1.0, 0.4, 0.3),
                                                         (0.7, 0.3, 0.9)])
def test_every_divergence_matches_its_plain_formula_in_loss_and_grads(divergence, temperature, ce_weight, skew):
    """Each divergence's closed-form gradient against autograd through the plain probability-space formula."""
    h_s, w_s, h_t, w_t, mask, labels = _inputs()
    kw = dict(temperature=temperature, ce_weight=ce_weight, labels=labels, divergence=divergence, skew=skew)
    loss = kd_loss(h_s, w_s, h_t, w_t, mask, chunk_tokens=7, **kw)
    ref = kd_loss_reference(h_s @ w_s.T, h_t @ w_t.T, mask, **kw)
    # float64: log space (logaddexp) against probability space differ by a few eps; measured <= 1e-15
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(torch.autograd.grad(loss * 1.7, (h_s, w_s)), torch.autograd.grad(ref * 1.7, (h_s, w_s))):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    forward = kd_loss(h_s, w_s, h_t, w_t, mask, chunk_tokens=7, temperature=temperature)
    assert abs(float(loss.detach() - forward.detach())) > 1e-3  # a different loss than the forward KL on these inputs


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "skew_kl", "skew_reverse_kl", "jsd"])
def test_every_divergence_is_zero_for_identical_distributions_and_positive_otherwise(divergence):
    h_s, w_s, h_t, w_t, mask, _ = _inputs()
    same = kd_loss(h_s, w_s, h_s.detach(), w_s.detach(), torch.ones(N), divergence=divergence, chunk_tokens=5)
    assert same.abs() < 1e-12  # the same logits: every divergence is exactly 0 up to rounding (float64)
    (grad,) = torch.autograd.grad(same, h_s)
    assert grad.abs().max() < 1e-12  # ...and at its minimum: zero gradient
    assert float(kd_loss(h_s, w_s, h_t, w_t, mask, divergence=divergence).detach()) > 0.01


def test_divergences_at_far_apart_logits_stay_finite():
    """Logits 200 apart: p and q each underflow to exactly 0 on tokens the other puts all its mass on, so a
    mixture formed in probability space would take log 0. In log space every loss and gradient stays finite."""
    eye = torch.eye(3, dtype=torch.float32)
    student = torch.tensor([[200.0, 0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 200.0, 0.0]])
    for divergence in ["reverse_kl", "skew_kl", "skew_reverse_kl", "jsd"]:
        loss = kd_loss(student, eye, teacher, eye, torch.ones(1), divergence=divergence, skew=0.1)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), divergence


def test_skew_kl_equals_a_value_worked_out_by_hand():
    """p = (1/2, 1/2), q = (1, 0) (logits 0 and -inf through a far-apart pair): m = 0.1 p + 0.9 q = (0.95, 0.05);
    KL(p || m) = 1/2 log(0.5/0.95) + 1/2 log(0.5/0.05) = 0.8303656...; JSD(0.5) of p and q: m = (3/4, 1/4),
    1/2 (1/2 log(2/3) + 1/2 log 2) + 1/2 log(4/3) = 0.2157616..."""
    eye = torch.eye(2, dtype=torch.float64)
    student = torch.tensor([[0.0, -800.0]], dtype=torch.float64)  # exp(-800) is 0 in float64
    teacher = torch.zeros(1, 2, dtype=torch.float64)
    skl = kd_loss(student, eye, teacher, eye, torch.ones(1), divergence="skew_kl", skew=0.1)
    assert float(skl) == pytest.approx(0.8303656, abs=1e-7)  # 7-decimal literal, float64
    jsd = kd_loss(student, eye, teacher, eye, torch.ones(1), divergence="jsd", skew=0.5)
    assert float(jsd) == pytest.approx(0.2157616, abs=1e-7)


def test_kd_loss_rejects_an_unknown_divergence_and_a_skew_outside_0_1():
    h_s, w_s, h_t, w_t, mask, _ = _inputs()
    with pytest.raises(CompactLMError, match="unknown divergence 'kl'"):
        kd_loss(h_s, w_s, h_t, w_t, mask, divergence="kl")
    with pytest.raises(CompactLMError, match="skew_kl needs 0 < skew < 1"):
        kd_loss(h_s, w_s, h_t, w_t, mask, divergence="skew_kl", skew=1.0)


def test_float32_matches_reference_and_bias_grad():
    h_s, w_s, h_t, w_t, mask, labels = _inputs(torch.float32)
    b_s = torch.randn(V, requires_grad=True)
    loss = kd_loss(h_s, w_s, h_t, w_t, mask, student_bias=b_s, chunk_tokens=6, ce_weight=0.2, labels=labels)
    ref = kd_loss_reference(h_s @ w_s.T + b_s, h_t @ w_t.T, mask, ce_weight=0.2, labels=labels)
    torch.testing.assert_close(loss, ref)
    for g, r in zip(torch.autograd.grad(loss, (h_s, w_s, b_s)), torch.autograd.grad(ref, (h_s, w_s, b_s))):
        torch.testing.assert_close(g, r)


def test_batched_shapes_and_tied_head():
    """(B, S, H) inputs; a head tied to the embedding gets both gradient paths through one Parameter."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(V, HS, dtype=torch.float64)
    ids = torch.randint(0, V, (2, 5))
    h_t, w_t = torch.randn(2, 5, HT, dtype=torch.float64), torch.randn(V, HT, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    loss = kd_loss(torch.tanh(emb(ids)), emb.weight, h_t, w_t, mask, chunk_tokens=3)
    (grad,) = torch.autograd.grad(loss, emb.weight)
    h = torch.tanh(emb(ids))
    ref = kd_loss_reference(h @ emb.weight.T, h_t @ w_t.T, mask)
    (ref_grad,) = torch.autograd.grad(ref, emb.weight)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_padding_contributes_nothing():
    h_s, w_s, h_t, w_t, mask, labels = _inputs()
    kw = dict(temperature=2.0, ce_weight=0.5, labels=labels, chunk_tokens=4)
    loss = kd_loss(h_s, w_s, h_t, w_t, mask, **kw)
    g_h, g_w = torch.autograd.grad(loss, (h_s, w_s))
    pad = mask == 0
    assert pad.any() and torch.all(g_h[pad] == 0)
    # scramble hidden states and labels at padded positions: loss and grads unchanged
    h_s2 = h_s.detach().clone()
    h_s2[pad] = 100 * torch.randn(int(pad.sum()), HS, dtype=h_s.dtype)
    h_s2.requires_grad_()
    h_t2 = h_t.clone()
    h_t2[pad] = -50.0
    labels2 = labels.clone()
    labels2[pad] = 3
    loss2 = kd_loss(h_s2, w_s, h_t2, w_t, mask, **{**kw, "labels": labels2})
    g_h2, g_w2 = torch.autograd.grad(loss2, (h_s2, w_s))
    # padded positions never enter a chunk: the same float64 operations in the same order (measured equal); 1e-12
    # is only a margin, far below what a leaked padded position would change
    torch.testing.assert_close(loss2, loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_h2, g_h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_w2, g_w, rtol=1e-12, atol=1e-12)
    # the same holds for the plain reference with arbitrary logits at padded positions
    s, t = (h_s @ w_s.T).detach(), h_t @ w_t.T
    s2, t2 = s.clone(), t.clone()
    s2[pad], t2[pad] = 1e3, -1e3
    ref = kd_loss_reference(s, t, mask, 2.0, 0.5, labels)
    torch.testing.assert_close(kd_loss_reference(s2, t2, mask, 2.0, 0.5, labels), ref)


def test_appending_padded_positions_leaves_loss_unchanged():
    h_s, w_s, h_t, w_t, mask, labels = _inputs()
    kw = dict(ce_weight=0.5, chunk_tokens=5)
    loss = kd_loss(h_s, w_s, h_t, w_t, mask, labels=labels, **kw)
    extra = 9
    h_s_pad = torch.cat([h_s, torch.randn(extra, HS, dtype=h_s.dtype)])
    h_t_pad = torch.cat([h_t, torch.randn(extra, HT, dtype=h_t.dtype)])
    mask_pad = torch.cat([mask, torch.zeros(extra, dtype=mask.dtype)])
    labels_pad = torch.cat([labels, torch.randint(0, V, (extra,))])
    loss_pad = kd_loss(h_s_pad, w_s, h_t_pad, w_t, mask_pad, labels=labels_pad, **kw)
    torch.testing.assert_close(loss_pad, loss, rtol=1e-12, atol=1e-12)  # as above: the same chunks (measured equal)


def test_all_padding_gives_zero_loss_and_grads():
    h_s, w_s, h_t, w_t, _, _ = _inputs()
    loss = kd_loss(h_s, w_s, h_t, w_t, torch.zeros(N))
    g_h, g_w = torch.autograd.grad(loss, (h_s, w_s))
    assert loss == 0 and torch.all(g_h == 0) and torch.all(g_w == 0)


def test_bf16_runs_and_returns_input_dtype_grads():
    h_s, w_s, h_t, w_t, mask, labels = _inputs(torch.float32)
    bf = [x.detach().to(torch.bfloat16).requires_grad_(x.requires_grad) for x in (h_s, w_s, h_t, w_t)]
    loss = kd_loss(*bf, mask, ce_weight=0.3, labels=labels, chunk_tokens=8)
    g_h, g_w = torch.autograd.grad(loss, (bf[0], bf[1]))
    assert loss.dtype == torch.float32 and g_h.dtype == g_w.dtype == torch.bfloat16
    ref = kd_loss(h_s, w_s, h_t, w_t, mask, ce_weight=0.3, labels=labels)
    # bf16 inputs and matmuls (8 significant bits: ~4e-3 per rounding) against float32: measured 1e-2 on a loss
    # of 8.2; a sanity bound that it computes the same loss, not a precision test
    torch.testing.assert_close(loss, ref.detach(), rtol=0.05, atol=0.05)


def test_no_grad_path_gives_the_same_loss():
    h_s, w_s, h_t, w_t, mask, _ = _inputs()
    with torch.no_grad():
        loss = kd_loss(h_s, w_s, h_t, w_t, mask, chunk_tokens=3)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _reference(h_s, w_s, h_t, w_t, mask).detach())


def test_kd_loss_rejects_mismatched_vocab():
    h_s, w_s, h_t, w_t, mask, _ = _inputs()
    with pytest.raises(CompactLMError, match="vocab"):
        kd_loss(h_s, w_s, h_t, w_t[:-1], mask)


def test_cosine_loss_identical_is_zero_and_ignores_padding():
    torch.manual_seed(0)
    s = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    assert cosine_loss(s, s.clone(), mask).abs() < 1e-6  # float32 cosine of a vector with itself: 1 - cos ~ eps 1.2e-7
    t = s.clone()
    t[mask == 0] = torch.randn(int((mask == 0).sum()), 8)
    assert cosine_loss(s, t, mask).abs() < 1e-6  # same as above
    assert torch.isclose(cosine_loss(s, -s, mask), torch.tensor(2.0))


def test_dynamic_alpha_is_detached_and_safe():
    logit = torch.tensor(3.0, requires_grad=True)
    inter = torch.tensor(0.5, requires_grad=True)
    alpha = dynamic_alpha(logit * 1.0, inter * 1.0)
    assert not alpha.requires_grad and alpha.item() == pytest.approx(6.0)  # 3 / 0.5 is exact in float32
    (alpha * inter).backward()
    assert inter.grad.item() == pytest.approx(6.0) and logit.grad is None  # exact too: d(alpha * inter)/d inter = 6
    zero = dynamic_alpha(logit, torch.tensor(0.0))
    assert zero.item() == 0.0 and torch.isfinite(zero)


def test_default_layer_map_and_explicit_pairs():
    assert default_layer_map(12, 30) == [(10, 28)]
    assert default_layer_map(12, 30, pairs=[[0, 0], [10, 28]]) == [(0, 0), (10, 28)]
    with pytest.raises(CompactLMError, match="out of range"):
        default_layer_map(12, 30, pairs=[(12, 5)])
    with pytest.raises(CompactLMError):
        default_layer_map(1, 30)


def test_grad_for_head_only():
    """Frozen hidden states (no grad): the head still gets the reference gradient."""
    h_s, w_s, h_t, w_t, mask, _ = _inputs()
    h = h_s.detach()
    (grad,) = torch.autograd.grad(kd_loss(h, w_s, h_t, w_t, mask, chunk_tokens=5), w_s)
    (ref,) = torch.autograd.grad(_reference(h, w_s, h_t, w_t, mask), w_s)
    torch.testing.assert_close(grad, ref)


def test_kd_loss_equals_a_value_worked_out_by_hand():
    """Teacher uniform over 3 tokens, student (1, 2, 3)/6 (logits log 1, log 2, log 3 through an identity head):
    KL = 1/3 (log(2) + log(1) + log(2/3)) = log(4/3) / 3 = 0.0958940...; the padded position counts for
    nothing; with ce_weight 0.5 and label 2, CE = -log(1/2) = 0.6931472... is added at half weight."""
    eye = torch.eye(3, dtype=torch.float64)
    student = torch.log(torch.tensor([[1.0, 2.0, 3.0], [5.0, 1.0, 1.0]], dtype=torch.float64))
    teacher = torch.zeros(2, 3, dtype=torch.float64)
    mask = torch.tensor([1, 0])
    loss = kd_loss(student, eye, teacher, eye, mask, chunk_tokens=1)
    assert float(loss) == pytest.approx(0.0958940, abs=1e-7)  # the literal is log(4/3)/3 to 7 decimals (2.4e-8 off)
    mixed = kd_loss(student, eye, teacher, eye, mask, ce_weight=0.5, labels=torch.tensor([2, 0]))
    assert float(mixed) == pytest.approx(0.0958940 + 0.5 * 0.6931472, abs=1e-7)  # same: 7-decimal literals, float64


@pytest.mark.parametrize("temperature,ce_weight", [(1.0, 0.0), (2.0, 0.5)])
def test_soft_capped_logits_match_the_reference_through_the_cap(temperature, ce_weight):
    """Gemma 2 caps its logits, cap * tanh(logits / cap): the chunked loss caps both models' logits and carries
    the gradient through the cap, as plain autograd on the capped logits does (cap 2: most logits bend)."""
    h_s, w_s, h_t, w_t, mask, labels = _inputs()
    capped = lambda logits, cap: torch.tanh(logits / cap) * cap  # noqa: E731
    kw = dict(temperature=temperature, ce_weight=ce_weight, labels=labels)
    loss = kd_loss(h_s, w_s, h_t, w_t, mask, chunk_tokens=7, student_cap=2.0, teacher_cap=3.0, **kw)
    ref = kd_loss_reference(capped(h_s @ w_s.T, 2.0), capped(h_t @ w_t.T, 3.0), mask, temperature, ce_weight, labels)
    # float64, as in the chunked test: only the order of the sums differs (measured <= 2e-15)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(torch.autograd.grad(loss * 1.7, (h_s, w_s)), torch.autograd.grad(ref * 1.7, (h_s, w_s))):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(loss, _reference(h_s, w_s, h_t, w_t, mask, **kw))  # the cap matters here: 50-66% off
    logp, ids = torch.log_softmax(capped(h_t @ w_t.T, 3.0) / temperature, -1).topk(8, dim=-1)
    sparse = topk_kd_loss(h_s, w_s, logp, ids, mask, temperature=temperature, chunk_tokens=5, student_cap=2.0)
    sparse_ref = topk_kd_loss_reference(capped(h_s @ w_s.T, 2.0), logp, ids, mask, temperature)
    # float64, but the student's tail q_tail = 1 - sum(q_K) is computed two ways (log1p here, 1 - sum in the
    # reference): it cancels, relative error ~eps / q_tail; the gradient divides by q_tail, hence 10x looser.
    # Measured <= 3e-16 absolute.
    torch.testing.assert_close(sparse, sparse_ref, rtol=1e-9, atol=1e-10)
    for g, r in zip(torch.autograd.grad(sparse, (h_s, w_s)), torch.autograd.grad(sparse_ref, (h_s, w_s))):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


def _topk_inputs(k: int, temperature: float = 1.0, seed: int = 0):
    """Student hidden/head and bias (grad), the teacher's top-k log-probabilities in float64 and ids, mask."""
    h_s, w_s, h_t, w_t, mask, _ = _inputs(seed=seed)
    b_s = torch.randn(V, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1)).requires_grad_()
    logp, ids = torch.log_softmax((h_t @ w_t.T) / temperature, -1).topk(k, dim=-1)
    return h_s, w_s, b_s, logp, ids, mask, h_t, w_t


@pytest.mark.parametrize("k,temperature,chunk", [(1, 1.0, 5), (8, 1.0, 7), (8, 2.0, 256), (39, 1.0, 4)])
def test_topk_chunked_matches_reference_in_loss_and_grads(k, temperature, chunk):
    h_s, w_s, b_s, logp, ids, mask, _, _ = _topk_inputs(k, temperature)
    loss = topk_kd_loss(h_s, w_s, logp, ids, mask, student_bias=b_s, temperature=temperature, chunk_tokens=chunk)
    grads = torch.autograd.grad(loss * 1.7, (h_s, w_s, b_s))
    ref = topk_kd_loss_reference(h_s @ w_s.T + b_s, logp, ids, mask, temperature)
    ref_grads = torch.autograd.grad(ref * 1.7, (h_s, w_s, b_s))
    # float64; q_tail cancels and divides the tail gradient, as in the soft-cap test (measured <= 1e-15)
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


def test_topk_with_every_token_is_the_dense_loss():
    """K = V: the teacher's tail is empty, the coarsened KL is the full KL, loss and grads equal kd_loss's."""
    h_s, w_s, _, logp, ids, mask, h_t, w_t = _topk_inputs(V, temperature=2.0)
    loss = topk_kd_loss(h_s, w_s, logp, ids, mask, temperature=2.0, chunk_tokens=6)
    dense = kd_loss(h_s, w_s, h_t, w_t, mask, temperature=2.0, chunk_tokens=6)
    # float64; the empty tail leaves only rounding residue (~1e-16) in r and q_tail (measured <= 6e-15)
    torch.testing.assert_close(loss, dense, rtol=1e-9, atol=1e-10)
    for g, r in zip(torch.autograd.grad(loss, (h_s, w_s)), torch.autograd.grad(dense, (h_s, w_s))):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


def test_topk_loss_is_a_lower_bound_that_tightens_with_k():
    """Coarsening to K + 1 outcomes never increases a KL: the sparse loss is <= the dense one, growing with K."""
    h_s, w_s, _, _, _, mask, h_t, w_t = _topk_inputs(1)
    dense = kd_loss(h_s, w_s, h_t, w_t, mask).item()
    losses = []
    for k in (1, 4, 16, 40):
        logp, ids = torch.log_softmax(h_t @ w_t.T, -1).topk(k, dim=-1)
        losses.append(topk_kd_loss(h_s, w_s, logp, ids, mask).item())
    # 1e-12: float64 rounding only (the steps measured >= 0.08); K = 40 = V is the dense loss (measured 4e-16 off)
    assert all(a <= b + 1e-12 for a, b in zip(losses, losses[1:])) and losses[-1] == pytest.approx(dense, rel=1e-9)
    assert 0 < losses[0] < dense


def test_sampled_targets_are_each_drawn_tokens_share_padded_with_zero_probability():
    logits = torch.randn(2, 3, V, dtype=torch.float64)
    logp, ids = teacher_sampled(logits, 16, 2.0, torch.Generator().manual_seed(0))
    assert logp.shape == ids.shape == (2, 3, 16) and logp.dtype == torch.float16 and ids.dtype == torch.int32
    p = logp.double().exp()
    kept = p > 0
    # shares are count / 16, log-rounded to float16 (9.8e-4 relative at most) and exactly 0 in the padding
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 3, dtype=torch.float64), rtol=0, atol=2e-3)
    for row_ids, row_kept in zip(ids.reshape(-1, 16), kept.reshape(-1, 16)):
        assert len(set(row_ids[row_kept].tolist())) == int(row_kept.sum())  # one slot per distinct token
        assert set(row_ids.tolist()) == set(row_ids[row_kept].tolist())  # padding repeats a drawn id
    again = teacher_sampled(logits, 16, 2.0, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], logp) and torch.equal(again[1], ids)  # the generator decides the draws
    many, many_ids = teacher_sampled(logits[:1, :1], 20_000, 2.0, torch.Generator().manual_seed(1))
    shares = torch.zeros(V, dtype=torch.float64).scatter_add_(0, many_ids.reshape(-1).long(), many.reshape(-1).double().exp())
    # 20,000 draws: each share's standard error is <= sqrt(0.25 / 20,000) = 0.0035; 0.02 is over 5 of them
    torch.testing.assert_close(shares, torch.softmax(logits[0, 0] / 2.0, -1), rtol=0, atol=0.02)


@pytest.mark.parametrize("chunk", [3, N])
def test_sampled_targets_match_the_reference_in_loss_and_grads(chunk):
    """Padding slots repeat a kept id at probability 0: the chunked loss must neither count them in the student's
    tail nor let them overwrite the kept slot's target, and must agree with plain autograd."""
    h_s, w_s, h_t, w_t, mask, _ = _inputs()
    logp, ids = teacher_sampled(h_t @ w_t.T, 8, 1.0, torch.Generator().manual_seed(0))
    assert (logp.double().exp() == 0).any()  # some padding to exercise
    loss = topk_kd_loss(h_s, w_s, logp.double(), ids, mask, chunk_tokens=chunk)
    ref = topk_kd_loss_reference(h_s @ w_s.T, logp.double(), ids, mask)
    # float64, as the top-K test: the tail mass is computed two ways (here r is float16 rounding, <= 2e-3)
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-10)
    for g, r in zip(torch.autograd.grad(loss, (h_s, w_s)), torch.autograd.grad(ref, (h_s, w_s))):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)


def test_sampled_targets_give_the_dense_gradient_on_average_where_the_top_k_do_not():
    """Random-sampling KD's point: the mean gradient over many sampled targets is the dense KL's gradient. The
    top-K gradient is biased (it spreads the tail in the student's proportions) and stays off."""
    h_s, w_s, h_t, w_t, mask, _ = _inputs()
    (dense,) = torch.autograd.grad(kd_loss(h_s, w_s, h_t, w_t, mask), h_s)
    g, runs = torch.Generator().manual_seed(0), 400
    mean = sum(torch.autograd.grad(topk_kd_loss(h_s, w_s, *_exact_shares(h_t @ w_t.T, 4, g), mask), h_s)[0]
               for _ in range(runs)) / runs
    logp, ids = torch.log_softmax(h_t @ w_t.T, -1).topk(4, dim=-1)
    (top,) = torch.autograd.grad(topk_kd_loss(h_s, w_s, logp, ids, mask), h_s)
    err, top_err = (mean - dense).abs().max(), (top - dense).abs().max()
    # 400 runs of 4 draws: the mean's error shrinks as 1/sqrt(1,600 draws); measured 0.005 against the top-4's
    # 0.07 (gradients up to 0.21): 0.02 leaves 4x for other draws
    assert err < 0.02 and top_err > 3 * err


def _exact_shares(logits, k, g):
    """teacher_sampled's draws with float64 shares (no float16 rounding), for the unbiasedness test."""
    logp, ids = teacher_sampled(logits, k, 1.0, g)
    p = logp.double().exp()
    return torch.where(p > 0, (p * k).round() / k, 0.0).log().clamp(min=-1e4), ids


def test_teacher_topk_stores_half_precision_values_and_int32_ids():
    logits = torch.randn(2, 3, V, dtype=torch.float64)
    logp, ids = teacher_topk(logits, 5, temperature=2.0)
    assert logp.shape == ids.shape == (2, 3, 5) and logp.dtype == torch.float16 and ids.dtype == torch.int32
    want = torch.log_softmax(logits / 2.0, -1).topk(5, dim=-1)
    # float16 storage: half an ulp is 2^-11 = 4.9e-4 relative, 9.8e-4 absolute for |logp| in [2, 4); measured 9.4e-4
    torch.testing.assert_close(logp.double(), want.values, rtol=1e-3, atol=1e-3)
    assert torch.equal(ids.long(), want.indices)
    with pytest.raises(CompactLMError, match="0 < K <= vocab"):
        topk_kd_loss(torch.zeros(2, HS), torch.zeros(V, HS), torch.zeros(2, V + 1), torch.zeros(2, V + 1), torch.ones(2))


def test_loss_values_are_exact_to_float32_at_a_262k_vocabulary():
    """Regression: a chunk's KL was one float32 dot over chunk x vocabulary elements, 1.7e-4 (relative) off the
    float64 value at 128 x 49,152 and growing with the vocabulary. At Gemma 3's 262,144 the float32 KD losses,
    dense, top-K and the validation KL, stay within 1e-6 of float64 computed from the same float32 logits (a row
    sum at float32 accuracy is ~1e-7 relative; the rows and chunks add in float64)."""
    from compactlm.metrics import token_sums

    vocab, n, width = 262_144, 128, 8
    g = torch.Generator().manual_seed(0)
    h_s, h_t = torch.randn(n, width, generator=g), torch.randn(n, width, generator=g)
    w_s, w_t = torch.randn(vocab, width, generator=g), torch.randn(vocab, width, generator=g)
    mask = torch.ones(n, dtype=torch.long)
    s_logits, t_logits = h_s @ w_s.T, h_t @ w_t.T  # (n, V) float32, as the chunked loss computes them
    want = kd_loss_reference(s_logits.double(), t_logits.double(), mask)
    got = kd_loss(h_s, w_s, h_t, w_t, mask, chunk_tokens=n)
    assert got.dtype == torch.float32 and abs(got.double() / want - 1) < 1e-6, (got.item(), want.item())
    logp, ids = teacher_topk(t_logits, 64)
    want = topk_kd_loss_reference(s_logits.double(), logp.double(), ids, mask)
    got = topk_kd_loss(h_s, w_s, logp, ids, mask, chunk_tokens=n)
    assert abs(got.double() / want - 1) < 1e-6, (got.item(), want.item())
    ids_in = torch.zeros(1, n, dtype=torch.long)  # validation: the KL sum over every position
    sums = token_sums(h_s[None], (w_s, None, None), ids_in, mask[None], h_t[None], (w_t, None, None), chunk_tokens=n)
    want = kd_loss_reference(s_logits.double(), t_logits.double(), mask) * n
    assert abs(sums[2] / want - 1) < 1e-6, (sums[2].item(), want.item())


@pytest.mark.parametrize("module", ["qwen3_moe", "mixtral"])
def test_load_balancing_loss_is_the_models_own(module):
    """Without a global load it is transformers' `load_balancing_loss_func` (what the ForCausalLM adds); with the
    load of the whole batch, two halves weighted by their tokens add up to the whole batch's loss."""
    import importlib

    from compactlm.distill.losses import expert_slots, load_balancing_loss

    theirs = importlib.import_module(f"transformers.models.{module}.modeling_{module}").load_balancing_loss_func
    g = torch.Generator().manual_seed(0)
    layers, experts, top_k = 3, 6, 2
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[1, 3:] = 0
    gates = tuple(torch.randn(20, experts, generator=g, dtype=torch.float64) for _ in range(layers))
    whole = load_balancing_loss(gates, top_k, mask)
    # both sum 3 layers x 20 rows in float32 (theirs after a float64 softmax, ours after a float32 one): a few
    # float32 roundings (eps 1.2e-7) apart, measured equal
    torch.testing.assert_close(whole, theirs(gates, experts, top_k, mask).to(whole), rtol=1e-6, atol=0)
    halves = [(tuple(gate.reshape(4, 5, -1)[rows].reshape(-1, experts) for gate in gates), mask[rows])
              for rows in (slice(0, 2), slice(2, 4))]
    slots, rows = (sum(parts) for parts in zip(*(expert_slots(gate, top_k, m) for gate, m in halves)))
    parts = [load_balancing_loss(gate, top_k, m, slots / rows) * m.sum() / mask.sum() for gate, m in halves]
    torch.testing.assert_close(sum(parts), whole, rtol=1e-6, atol=0)  # float32 sums of ~20 terms
    assert not torch.allclose(sum(load_balancing_loss(gate, top_k, m) * m.sum() / mask.sum() for gate, m in halves),
                              whole, rtol=1e-3)  # per-half loads: another objective (8e-3 off; float32 noise ~1e-7)
