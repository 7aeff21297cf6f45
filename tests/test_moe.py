"""Mixtures of experts (Qwen3-MoE, Mixtral): expert surgery against a router that never picks the dropped
experts, expert scores against a token-by-token computation, targets, active parameters, the router loss.

The invariants every family shares (keep-all, zeroed neurons, heads and layers, reload) run on both in
test_pruning.py through the conftest factory."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import MOE, tiny_config, tiny_model
from test_pruning import logits, scores_for

from compactlm.arch_search import enumerate_candidates
from compactlm.models.params import param_count
from compactlm.config import SearchConfig, TargetConfig
from compactlm.errors import CompactLMError
from compactlm.importance import activation_scores
from compactlm.importance.scores import Scores
from compactlm.models.family import family_of, get_module
from compactlm.models.params import num_params
from compactlm.pruning import Plan, keep_all, make_plan, prune_model, resolve_target


def _route(router, hidden: torch.Tensor, allowed: torch.Tensor | None = None):
    """The router's own computation (softmax over experts in float32, top-k, renormalised where the family
    does), with experts outside `allowed` masked out of the softmax: (top-k weights, top-k indices)."""
    logits_ = F.linear(hidden, router.weight).float()  # (T, E)
    if allowed is not None:
        blocked = torch.ones(logits_.shape[-1], dtype=torch.bool)
        blocked[allowed] = False
        logits_[:, blocked] = -torch.inf
    top, index = torch.topk(logits_.softmax(-1), router.top_k, dim=-1)
    if getattr(router, "norm_topk_prob", True):  # Mixtral always renormalises
        top = top / top.sum(-1, keepdim=True)
    return top.to(hidden.dtype), index


@pytest.mark.parametrize("family,norm_topk", [("qwen3_moe", False), ("qwen3_moe", True), ("mixtral", True)])
def test_pruning_experts_equals_a_router_that_never_picks_them(family, norm_topk, token_batch, monkeypatch):
    """Cutting experts (router rows and expert weights) computes exactly what the full model computes when its
    router masks those experts out of the softmax: nothing else changes, whether or not the top-k weights are
    renormalised (Qwen3-MoE's norm_topk_prob; Mixtral always)."""
    model = tiny_model(family)
    if family == "qwen3_moe":
        model.config.norm_topk_prob = norm_topk
        for layer in model.model.layers:
            layer.mlp.gate.norm_topk_prob = norm_topk
    fam = family_of(model)
    dims = fam.dims(model.config)
    plan = make_plan(scores_for(model, seed=4), dims, resolve_target(
        TargetConfig(**{fam.keys["experts"]: 3}), dims, fam), [])
    assert not all(torch.equal(plan.experts[0], e) for e in plan.experts[1:])  # layers keep different experts
    pruned = prune_model(model, plan)
    for i, layer in enumerate(get_module(model, fam.layers_path)):
        router, kept = layer.mlp.gate, plan.experts[i]
        monkeypatch.setattr(router, "forward", lambda h, r=router, k=kept: (None, *_route(r, h, k)))
    # float32: a softmax over 3 experts vs over 4 with one masked, expert outputs summed in another order: a few
    # roundings (eps 1.2e-7) of logits |x| < 1, 3 layers deep; measured 9e-8
    torch.testing.assert_close(logits(pruned, token_batch), logits(model, token_batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", MOE)
def test_expert_scores_equal_a_token_by_token_computation(family, token_batch):
    """REAP (mean over routed tokens of router weight x output norm), its sum over the tokens (per routed
    slot), routing frequency (share of the routed slots) and each expert's neuron scores (mean |act| over its tokens), computed here one token at a time from
    the layer's input; padding left out."""
    model = tiny_model(family)
    fam = family_of(model)
    dims = fam.dims(model.config)
    inputs = []
    handles = [layer.mlp.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
               for layer in get_module(model, fam.layers_path)]
    with torch.no_grad():
        model(**token_batch)
    for handle in handles:
        handle.remove()
    got = activation_scores(model, [token_batch])
    real = token_batch["attention_mask"].reshape(-1).bool()
    for i, layer in enumerate(get_module(model, fam.layers_path)):
        experts = layer.mlp.experts
        hidden = inputs[i].reshape(-1, dims.hidden)[real]  # (T, H) real tokens
        weights, index = _route(layer.mlp.gate, hidden)
        count, mass = torch.zeros(dims.experts), torch.zeros(dims.experts)
        neurons = torch.zeros(dims.experts, dims.ffn)
        for t in range(len(hidden)):
            for w, e in zip(weights[t].tolist(), index[t].tolist()):
                gate, up = (experts.gate_up_proj[e] @ hidden[t]).chunk(2)
                act = F.silu(gate) * up
                count[e] += 1
                mass[e] += w * (experts.down_proj[e] @ act).norm()
                neurons[e] += act.abs()
        assert count.sum() == real.sum() * dims.top_k and torch.all(count > 0)
        torch.testing.assert_close(got.experts["frequency"][i], count / count.sum())
        torch.testing.assert_close(got.experts["reap"][i], mass / count)
        torch.testing.assert_close(got.experts["reap_sum"][i], mass / count.sum())
        torch.testing.assert_close(got.ffn[i], neurons / count[:, None])


def test_targets_name_the_experts_as_each_config_does():
    qwen, mixtral, llama = (tiny_model(f) for f in ("qwen3_moe", "mixtral", "llama"))
    for model, good, foreign in ((qwen, "num_experts", "num_local_experts"), (mixtral, "num_local_experts", "num_experts")):
        fam = family_of(model)
        dims = fam.dims(model.config)
        assert resolve_target(TargetConfig(**{good: 0.75}), dims, fam).experts == 3
        with pytest.raises(CompactLMError, match=f"target.{foreign}: {fam.name} has no such size"):
            resolve_target(TargetConfig(**{foreign: 3}), dims, fam)
        with pytest.raises(CompactLMError, match=f"target.{good}=1 is fewer than the 2 experts each token"):
            resolve_target(TargetConfig(**{good: 1}), dims, fam)
        with pytest.raises(CompactLMError, match=f"target.{good}=5 is larger than the source model's 4"):
            resolve_target(TargetConfig(**{good: 5}), dims, fam)
    fam = family_of(qwen)
    with pytest.raises(CompactLMError, match="target.intermediate_size: qwen3_moe has no such size"):
        resolve_target(TargetConfig(intermediate_size=8), fam.dims(qwen.config), fam)
    assert resolve_target(TargetConfig(moe_intermediate_size=0.5), fam.dims(qwen.config), fam).ffn == 12
    fam = family_of(llama)
    with pytest.raises(CompactLMError, match="target.num_experts: llama has no such size"):
        resolve_target(TargetConfig(num_experts=2), fam.dims(llama.config), fam)


def test_dense_layers_among_experts_are_refused():
    config = tiny_config("qwen3_moe")
    config.mlp_only_layers = [1]
    with pytest.raises(CompactLMError, match="dense MLP layers among the expert layers"):
        family_of(config).dims(config)


@pytest.mark.parametrize("family", MOE)
def test_active_parameters_count_top_k_experts(family):
    """Active parameters: everything but the routed experts, plus top_k of them; the count of a pruned shape
    equals the pruned model's, and the search meets an active budget."""
    model = tiny_model(family)
    fam = family_of(model)
    dims = fam.dims(model.config)
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    want = num_params(model) - expert_params + expert_params * dims.top_k // dims.experts
    assert param_count(model, fam, dims, active=True) == want
    target = dataclasses.replace(dims, experts=3, ffn=12, hidden=24)
    pruned = prune_model(model, make_plan(scores_for(model), dims, target, []))
    assert param_count(model, fam, target) == num_params(pruned)
    pruned_experts = sum(p.numel() for n, p in pruned.named_parameters() if ".experts." in n)
    assert param_count(model, fam, target, active=True) == num_params(pruned) - pruned_experts // 3
    budget = param_count(model, fam, target, active=True)
    found = enumerate_candidates(model, SearchConfig(target_active_params=budget, tolerance=0.02, divisor=4))
    assert found and all(abs(c.active_params - budget) <= 0.02 * budget for c in found)
    wide = SearchConfig(target_params=0.7, tolerance=0.3, max_candidates=1000)
    assert any(c.dims.experts < dims.experts for c in enumerate_candidates(model, wide))  # the grid cuts experts
    with pytest.raises(CompactLMError, match="search.target_active_params: llama is dense"):
        enumerate_candidates(tiny_model("llama"), SearchConfig(target_active_params=0.5))


@pytest.mark.parametrize("family", MOE)
def test_plan_and_scores_round_trip_with_experts(family, token_batch, tmp_path):
    model = tiny_model(family)
    fam = family_of(model)
    dims = fam.dims(model.config)
    scores = activation_scores(model, [token_batch])
    scores.save(tmp_path / "scores.safetensors")
    loaded = Scores.load(tmp_path / "scores.safetensors")
    assert loaded.experts.keys() == {"reap_sum", "reap", "frequency"} and all(
        torch.equal(loaded.experts[k], scores.experts[k]) for k in scores.experts)
    loaded.check(dims, "scores")
    target = resolve_target(TargetConfig(**{fam.keys["experts"]: 2, fam.keys["ffn"]: 0.5}), dims, fam)
    plan = make_plan(loaded, dims, target, [1], expert_metric="frequency")
    plan.save(tmp_path / "plan.json")
    import json

    again = Plan.from_json(json.loads((tmp_path / "plan.json").read_text()), dims)
    assert all(torch.equal(a, b) for a, b in zip(again.experts, plan.experts) if len(a))
    torch.testing.assert_close(logits(prune_model(model, again), token_batch), logits(prune_model(model, plan), token_batch),
                               rtol=0, atol=0)  # exact: the same kept experts, so the same model
    with pytest.raises(CompactLMError, match="target.expert_metric=random: the scores hold only frequency, reap, reap_sum"):
        make_plan(loaded, dims, target, [], expert_metric="random")
    bad = dataclasses.replace(keep_all(dims), experts=[])
    with pytest.raises(CompactLMError, match="plan.experts must list the kept experts"):
        bad.validate(dims)


def test_moe_checkpoints_are_cut_in_memory(tmp_path, token_batch):
    """The checkpoint stores each expert apart (save_pretrained un-fuses them): streamed surgery and
    layer-by-layer loading refuse it."""
    from compactlm.pruning.stream import prune_checkpoint

    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(CompactLMError, match="streamed surgery does not read mixture-of-experts checkpoints"):
        prune_checkpoint(tmp_path / "src", keep_all(family_of(model).dims(model.config)), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    from compactlm import inputs
    from compactlm.config import load_config

    with pytest.raises(CompactLMError, match="memory_gb=1e-05: layer by layer does not read mixtures of experts"):
        inputs.layerwise(load_config(None, [f"model={tmp_path / 'src'}", "memory_gb=0.00001"]))


@pytest.mark.parametrize("family", MOE)
def test_the_student_trains_with_its_load_balancing_loss(family, token_batch):
    """With output_router_logits set, the training loss is the model's own: CE + router_aux_loss_coef x the
    load-balancing loss, as its ForCausalLM computes them."""
    from compactlm.distill.trainee import Objective, Trainee

    model = tiny_model(family)
    model.config.output_router_logits, model.config.router_aux_loss_coef = True, 0.5
    model.router_aux_loss_coef = 0.5  # what the ForCausalLM read from its config when it was built
    ids = token_batch["input_ids"]
    mask = torch.ones_like(ids)
    parts = Trainee(model, Objective())(ids, mask)
    want = model(input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(parts["loss_router"], want.aux_loss.detach())
    torch.testing.assert_close(parts["loss"], want.loss)
    model.config.output_router_logits = False
    assert "loss_router" not in Trainee(model, Objective())(ids, mask)


def test_run_with_an_active_parameter_budget(bpe_tokenizer, text_file, tmp_path, capsys):
    """`compactlm run` with search.target_active_params on a tiny Qwen3-MoE: the chosen shape (experts
    included) meets the budget, is what gets pruned, and search.md lists experts and active parameters."""
    import json

    from test_pipeline import tiny_run_args
    from transformers import AutoModelForCausalLM

    from compactlm import pipeline
    from compactlm.cli import main

    config = tiny_config("qwen3_moe", 4, 2, tied=True, layers=3)
    config.vocab_size, config.eos_token_id, config.pad_token_id, config.bos_token_id = len(bpe_tokenizer), 0, 0, 0
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "moe")
    bpe_tokenizer.save_pretrained(tmp_path / "moe")
    run_dir = tmp_path / "run"
    args = tiny_run_args(tmp_path / "moe", text_file, run_dir) + [
        "search.target_active_params=0.75", "search.tolerance=0.1", "search.max_candidates=3", "search.top_k=1",
        "search.distill_steps=2", "target.layer_metric=block_importance", "distill.steps=2", "eval.speed=false"]
    assert main(["run", *args]) == 0, capsys.readouterr().err
    chosen = json.loads((run_dir / "search" / pipeline.DONE).read_text())
    student = AutoModelForCausalLM.from_pretrained(run_dir / "distill" / "final")
    assert student.config.num_experts == chosen["target"]["num_experts"]
    assert student.config.moe_intermediate_size == chosen["target"]["moe_intermediate_size"]
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    fam = family_of(teacher)
    full = param_count(teacher, fam, fam.dims(teacher.config), active=True)
    assert abs(param_count(student, fam, fam.dims(student.config), active=True) - 0.75 * full) <= 0.1 * 0.75 * full
    assert "| experts | params | active params |" in (run_dir / "search" / "search.md").read_text()
