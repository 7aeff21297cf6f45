"""Reconstruction after pruning (`prune.reconstruct`): invariants and that it reduces the error it targets."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, MOE, VOCAB, ffn_key, tiny_model
from test_pruning import logits, scores_for, smaller_plan, zero_neurons_
from transformers import AutoModelForCausalLM

from compactlm.config import TargetConfig
from compactlm.errors import CompactLMError
from compactlm.models.family import family_of
from compactlm.pruning import keep_all, make_plan, prune_model, resolve_target
from compactlm.pruning import reconstruct as reconstruct_module
from compactlm.pruning.reconstruct import reconstruct, ridge_factor, ridge_fit

EXACT = 1e-12  # a relative ridge this small leaves an exactly solvable fit exact: G and C are float64, whose noise
# (~1e-16 x |G|) stays far below it even where G is badly conditioned (condition numbers up to 3e8 here)
# Logits of a refit that should change nothing: float32 forward noise through 3 tiny layers (eps 1.2e-7 times
# logits of order 1-10, a few roundings per layer) is ~1e-6; the float64 solve adds ~4e-7 (measured). A refit
# from float32 statistics was 1e-3 off, so 2e-5 still fails any return of that error on every instruction set.
LOGITS_EXACT = {"rtol": 2e-5, "atol": 2e-5}


def calibration(seed: int = 3, rows: int = 8, seq: int = 32) -> list[dict[str, torch.Tensor]]:
    """Two batches of random tokens (512 tokens: more than any tiny model's widest input), one row padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (rows, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, seq // 2:] = 0
    half = rows // 2
    return [{"input_ids": ids[:half], "attention_mask": mask[:half]},
            {"input_ids": ids[half:], "attention_mask": mask[half:]}]


def model_for(family: str, layers: int = 3):
    """A tiny model of `family`; GPT-2's projections scaled up 10x: at its init scale (0.02) a 3-layer GPT-2
    barely depends on its input, so there would be nothing for a fit to recover."""
    model = tiny_model(family, 4, 4 if family == "gpt2" else 2, layers=layers)
    if family == "gpt2":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2 and ".h." in name:
                    p.mul_(10.0)
    return model


def test_ridge_fit_solves_the_normal_equations():
    torch.manual_seed(0)
    z, w = torch.randn(200, 6), torch.randn(3, 6)
    y = z @ w.T
    fitted = ridge_fit(z.T @ z, y.T @ z, EXACT, bias=False)
    torch.testing.assert_close(fitted.float(), w, rtol=1e-4, atol=1e-4)  # float32 z: a well-conditioned 6 x 6 G
    ones = torch.cat([z, torch.ones(200, 1)], 1)  # a bias column, fitted without penalty
    with_bias = ridge_fit(ones.T @ ones, (y + 2.0).T @ ones, 10.0, bias=True)
    # statistical: ridge 10 shrinks the weights ~11x and the unpenalised bias absorbs mean(z) . (w - fitted w),
    # mean(z) ~ N(0, 1/200) per input: ~0.1 for the mean of 3 biases; measured 0.09
    assert torch.allclose(with_bias[:, -1].float().mean(), torch.tensor(2.0), atol=0.3)


def test_ridge_fit_without_a_cholesky_factor_solves_the_same_system():
    """A matrix that is not numerically positive definite is solved by LU instead; both give one answer."""
    torch.manual_seed(1)
    z = torch.randn(50, 5, dtype=torch.float64)
    gram, cross = z.T @ z, torch.randn(2, 5, dtype=torch.float64)
    matrix, cholesky = ridge_factor(gram, 1e-3, bias=False)
    assert cholesky
    plain = ridge_fit(gram, cross, 1e-3, bias=False, factor=(matrix @ matrix.T, False))
    torch.testing.assert_close(ridge_fit(gram, cross, 1e-3, bias=False), plain)
    assert not ridge_factor(-torch.eye(3), 1e-3, bias=False)[1]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sites", ["outputs", "all"])
def test_shared_statistics_and_replayed_attention_change_no_weight(family, sites, monkeypatch):
    """One G per input shared by q/k/v (gate/up) and the replayed attention outputs give exactly the weights of
    fitting each projection from its own G with the attention run again in every pass."""
    model = model_for(family)
    plan = smaller_plan(model, drop=1)
    fast, plain = prune_model(model, plan), prune_model(model, plan)
    reconstruct(model, fast, plan, calibration(), sites=sites)
    monkeypatch.setattr(reconstruct_module, "_share_grams", lambda stage: None)
    monkeypatch.setattr(reconstruct_module._Replay, "hooks", lambda self: [])
    reconstruct(model, plain, plan, calibration(), sites=sites)
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        # the same sums in another order: float64 statistics, then float32 weights (eps 1.2e-7, values of order 1)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("inputs", ["sequential", "teacher"])
def test_keep_all_reconstruction_changes_nothing(family, inputs, token_batch):
    """The student equals the teacher: every fit is exact and gives back the teacher's own weights."""
    model = model_for(family)
    student = prune_model(model, keep_all(family_of(model).dims(model.config)))
    reconstruct(model, student, keep_all(family_of(model).dims(model.config)), calibration(), sites="all",
                inputs=inputs, ridge=EXACT)
    torch.testing.assert_close(logits(student, token_batch), logits(model, token_batch), **LOGITS_EXACT)


@pytest.mark.parametrize("family", FAMILIES)
def test_reconstruction_after_pruning_zeroed_neurons_changes_nothing(family, token_batch):
    """Neurons whose down_proj columns are zero contribute nothing: the kept columns already fit exactly."""
    model = model_for(family)
    fam = family_of(model)
    dims = fam.dims(model.config)
    scores = scores_for(model)
    plan = make_plan(scores, dims, zero_neurons_(model, scores, 16), [])
    student = prune_model(model, plan)
    reconstruct(model, student, plan, calibration(), sites="outputs", ridge=EXACT)
    torch.testing.assert_close(logits(student, token_batch), logits(model, token_batch), **LOGITS_EXACT)


def logit_error(teacher, student, batches) -> float:
    """Mean squared difference of the student's log-probabilities from the teacher's over the batches."""
    with torch.no_grad():
        errors = [(teacher(**b).logits.log_softmax(-1) - student(**b).logits.log_softmax(-1)).square().mean()
                  for b in batches]
    return float(torch.stack(errors).mean())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sites", ["outputs", "all"])
def test_sequential_reconstruction_brings_the_cut_model_closer_to_the_teacher(family, sites):
    """Every axis cut and a layer dropped: on the calibration text the refitted student is closer to the teacher
    than the plainly sliced one."""
    model = model_for(family)
    plan = smaller_plan(model, drop=1)
    batches = calibration()
    plain, refitted = prune_model(model, plan), prune_model(model, plan)
    result = reconstruct(model, refitted, plan, batches, sites=sites, inputs="sequential")
    per_layer = 1 if sites == "outputs" and family in MOE else 2  # a mixture of experts refits its attention only
    assert result["sites"] >= 2 * per_layer and result["tokens"] == 8 * 32 - 16  # padding excluded
    assert logit_error(model, refitted, batches) < logit_error(model, plain, batches)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in MOE])  # MoE refits no expert: nothing to refit
def test_teacher_input_reconstruction_helps_a_width_only_mlp_cut(family):
    """From the teacher's inputs: right when only MLP neurons go (with hidden channels or layers cut too, the
    student's inputs drift from the teacher's and the sequential fit is the one to use)."""
    model = model_for(family)
    fam = family_of(model)
    dims = fam.dims(model.config)
    plan = make_plan(scores_for(model), dims, resolve_target(TargetConfig(**{ffn_key(fam): 0.5}), dims, fam), [])
    batches = calibration()
    plain, refitted = prune_model(model, plan), prune_model(model, plan)
    reconstruct(model, refitted, plan, batches, sites="outputs", inputs="teacher")
    assert logit_error(model, refitted, batches) < logit_error(model, plain, batches)


def test_gpt2_renumbered_layers_keep_their_query_scaling(token_batch):
    """GPT-2 with scale_attn_by_inverse_layer_idx: a refitted c_attn of a moved layer keeps the rescaled queries,
    so with every width kept and teacher inputs, reconstruction equals plain surgery."""
    base = model_for("gpt2", layers=4)
    base.config.scale_attn_by_inverse_layer_idx = True
    model = AutoModelForCausalLM.from_config(base.config).eval()
    model.load_state_dict(base.state_dict())
    dims = family_of(model).dims(model.config)
    plan = keep_all(dims)
    plan = type(plan)(plan.hidden, plan.heads, plan.kv_heads, plan.ffn, torch.tensor([1, 2, 3]))
    plain, refitted = prune_model(model, plan), prune_model(model, plan)
    reconstruct(model, refitted, plan, calibration(), sites="all", inputs="teacher", ridge=EXACT)
    torch.testing.assert_close(logits(refitted, token_batch), logits(plain, token_batch), **LOGITS_EXACT)


def test_reconstruction_leaves_the_teacher_alone():
    model = tiny_model("llama", 4, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = smaller_plan(model, drop=0)
    reconstruct(model, prune_model(model, plan), plan, calibration(), sites="all")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_bad_reconstruction_names_the_key():
    model = tiny_model("llama", 4, 2)
    plan = keep_all(family_of(model).dims(model.config))
    with pytest.raises(CompactLMError, match="prune.reconstruct_inputs"):
        reconstruct(model, prune_model(model, plan), plan, calibration(), inputs="student")
    with pytest.raises(CompactLMError, match="prune.reconstruct"):
        reconstruct(model, prune_model(model, plan), plan, calibration(), sites="none")


def test_too_few_calibration_tokens_keep_the_sliced_weights(token_batch, caplog):
    """Fewer than 4 tokens per input of a projection: that projection is not refitted (a fit would follow the
    text), the others are, and the log says which and what to raise."""
    model = model_for("llama")
    plan = smaller_plan(model, drop=1)
    plain, refitted = prune_model(model, plan), prune_model(model, plan)
    few = [{k: v[:2, :16] for k, v in calibration()[1].items()}]  # 32 tokens: below 4 x (24 or 24 + 1) inputs
    with caplog.at_level("WARNING"):
        result = reconstruct(model, refitted, plan, few, sites="all")
    assert result["sites"] == 0 and result["skipped"] > 0 and "raise calib.sequences" in caplog.text
    # exact: every projection kept its sliced weights, the same model as plain
    torch.testing.assert_close(logits(refitted, token_batch), logits(plain, token_batch), rtol=0, atol=0)
