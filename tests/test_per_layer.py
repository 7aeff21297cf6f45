"""Per-layer widths: the allocation spends the uniform target's parameters, surgery with a different shape in
every layer is exact (pruning units that were zeroed changes nothing), and the refit runs on it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FAMILIES, MOE, positive_scores, tiny_model
from conftest import per_layer_plan_of as _plan

from compactlm.errors import CompactLMError
from compactlm.metrics import perplexity
from compactlm.models.family import get_module
from compactlm.models.params import param_count
from compactlm.pruning import head_channels, prune_model
from compactlm.pruning.per_layer import _allocate, _budgets, per_layer_plan, plan_params, search_strength
from compactlm.pruning.reconstruct import reconstruct

# OLMo 2 normalises q and k over all heads of a layer at once: a pruned head changes the kept ones' scale, so
# zeroed heads are not free there (test_pruning.py copies heads to work around it, for uniform plans only)
DENSE = [f for f in FAMILIES if f not in MOE and f not in ("gpt2", "olmo2")]


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("family", DENSE)
def test_pruning_zeroed_units_of_a_per_layer_plan_changes_nothing(family, token_batch):
    """Every layer keeps its own neurons and KV groups; zero what each drops, and the pruned model (a different
    shape in each layer) computes what the source did."""
    model = tiny_model(family, 4, 2, layers=4)
    fam, source, _, plan = _plan(model)
    assert plan.per_layer and len({len(plan.ffn[i]) for i in range(source.layers)}) > 1
    for layer in range(source.layers):
        prefix = f"{fam.layers_path}.{layer}."
        dead = torch.tensor(sorted(set(range(source.ffn)) - set(plan.ffn[layer].tolist())), dtype=torch.long)
        dead_heads = torch.tensor(sorted(set(range(source.heads)) - set(plan.heads[layer].tolist())), dtype=torch.long)
        with torch.no_grad():
            get_module(model, prefix + fam.mlp_out_path).weight[:, dead] = 0.0
            get_module(model, prefix + fam.attn_out_path).weight[:, head_channels(dead_heads, source.head_dim)] = 0.0
    pruned = prune_model(model, plan)
    assert sum(p.numel() for p in pruned.parameters()) == plan_params(model, fam, source, plan)
    # the zeroed units added exact zeros; narrower projections sum in another order (float32, 4 layers), as
    # test_pruning.py's zeroed-unit tests: measured <= 2e-7
    torch.testing.assert_close(logits(pruned, token_batch), logits(model, token_batch), rtol=1e-5, atol=1e-5)
    pruned.train()
    pruned(**token_batch, labels=token_batch["input_ids"]).loss.backward()  # it trains: every weight gets a grad
    assert all(p.grad is not None for p in pruned.parameters())


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_per_layer_plan_spends_the_uniform_targets_parameters(family):
    model = tiny_model(family, 4, 2, layers=4)
    fam, source, target, plan = _plan(model)
    uniform = param_count(model, fam, target)
    per_neuron = 3 * target.hidden  # gate, up and down: a neuron's weights (no MLP biases in these families)
    assert uniform - per_neuron < plan_params(model, fam, source, plan) <= uniform
    assert [len(plan.heads[i]) for i in range(source.layers)] == [source.groups * len(plan.kv_heads[i])
                                                                   for i in range(source.layers)]  # whole groups


def test_allocate_keeps_each_layers_best_then_the_global_best():
    scores = torch.tensor([[0.1, 0.2, 0.3], [5.0, 4.0, 0.0], [0.0, 0.05, 0.01]])
    keep = _allocate(scores, 5)
    assert keep.tolist() == [[False, True, True], [True, True, False], [False, True, False]]
    with pytest.raises(CompactLMError, match="cannot keep 2 of 3 x 3"):
        _allocate(scores, 2)


def test_strength_moves_each_layers_budget_from_uniform_to_the_ranking():
    """Strength 1 is the global ranking (each layer's best, then the best of the rest); 0 gives every layer the
    same count; in between each layer's count lies between its two ends, the total never changes, and a layer
    always keeps its own best units."""
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.0], [5.0, 4.0, 0.0, 3.0], [0.0, 0.05, 0.01, 0.02]])
    assert torch.equal(_allocate(scores, 6, 1.0), _allocate(scores, 6))
    assert _allocate(scores, 6).sum(dim=1).tolist() == [2, 3, 1]
    assert _allocate(scores, 6, 0.0).sum(dim=1).tolist() == [2, 2, 2]
    assert _allocate(scores, 6, 0.0).tolist() == [[False, True, True, False], [True, True, False, False],
                                                  [False, True, False, True]]
    ranked = torch.tensor([1, 3, 2, 9, 5])
    for strength in (0.0, 0.25, 0.5, 0.7, 1.0):
        counts = _budgets(ranked, 20, strength)
        assert int(counts.sum()) == 20 and counts.dtype == torch.long
        exact = 4 + strength * (ranked - 4.0)
        assert ((counts - exact).abs() < 1).all()  # rounding moves a count by less than one unit
    assert _budgets(ranked, 20, 1.0).tolist() == ranked.tolist() and _budgets(ranked, 20, 0.0).tolist() == [4] * 5


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_every_strength_spends_the_same_parameters_and_the_search_keeps_the_lowest_loss(family, token_batch):
    model = tiny_model(family, 4, 2, layers=4)
    fam, source, target, _ = _plan(model)
    scores, layers = positive_scores(model, seed=0), torch.arange(source.layers)
    plans = {s: per_layer_plan(model, scores, fam, source, target, layers, strength=s) for s in (0.0, 0.5, 1.0)}
    assert len({plan_params(model, fam, source, p) for p in plans.values()}) == 1
    assert {len(plans[0.0].kv_heads[i]) for i in range(source.layers)} == {target.kv_heads}  # uniform counts
    assert len({len(plans[1.0].ffn[i]) for i in range(source.layers)}) > 1
    assert not plans[0.0].per_layer  # the same shape in every layer: an ordinary checkpoint
    for plan in plans.values():
        plan.validate(source)
    best, losses = search_strength(model, plans, [token_batch])
    direct = {s: perplexity(prune_model(model, p), [token_batch])["loss"] for s, p in plans.items()}
    assert losses == pytest.approx(direct, rel=1e-6) and best == min(direct, key=direct.get)
    with pytest.raises(CompactLMError, match="strength 1.5 must lie in"):
        per_layer_plan(model, scores, fam, source, target, layers, strength=1.5)


def test_refit_runs_on_a_per_layer_model_and_brings_it_closer(token_batch):
    teacher = tiny_model("llama", 4, 2, layers=3)
    _, _, _, plan = _plan(teacher, ffn_fraction=0.4)
    student = prune_model(teacher, plan)
    ids = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # 256 tokens: 8 per input of a 32-wide layer
    want = logits(teacher, batch)
    before = (logits(student, batch) - want).pow(2).mean()
    assert reconstruct(teacher, student, plan, [batch], ridge=1e-4)["skipped"] == 0
    after = (logits(student, batch) - want).pow(2).mean()
    # least squares on these very tokens: the refitted layers match the teacher better (measured 0.0018 -> 0.0005)
    assert after < 0.9 * before


def test_a_mixture_of_experts_and_gpt2_are_refused():
    for family, message in (("qwen3_moe", "mixture of experts"), ("gpt2", "per-layer widths")):
        model = tiny_model(family, 4, 4 if family == "gpt2" else 2)
        with pytest.raises(CompactLMError, match=message):
            _plan(model, heads=2)


def test_a_per_layer_student_distils_in_memory(tmp_path):
    """The per-layer model goes through the distillation loop (KD from its source): every weight moves, the
    losses stay finite, and each layer keeps its own shape."""
    from compactlm.config import load_config
    from compactlm.distill.distributed import Dist
    from compactlm.distill.loop import Session, fit

    teacher = tiny_model("llama", 4, 2, layers=3)
    _, _, _, plan = _plan(teacher)
    student = prune_model(teacher, plan)
    g = torch.Generator().manual_seed(0)
    train, val = torch.randint(0, 64, (16, 16), generator=g), torch.randint(0, 64, (4, 16), generator=g)
    tc = load_config(None, ["distill.steps=4", "distill.batch_size=4", "distill.warmup_steps=1", "distill.lr=0.001",
                            "distill.eval_every=0"]).distill
    session = Session(tmp_path, Dist(0, 1, torch.device("cpu")), save=False)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    result = fit(student, train, val, tc, session, teacher=teacher, hidden_keep=plan.hidden)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result["steps"] == 4 and all(math.isfinite(x) and x > 0 for x in losses)
    assert all(not torch.equal(p, before[n]) for n, p in student.named_parameters())
    assert [p.shape[0] for n, p in student.named_parameters() if n.endswith("mlp.up_proj.weight")] == [
        len(plan.ffn[i]) for i in range(3)]  # the loop kept each layer's own shape


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "phi3"])
def test_a_per_layer_model_saves_and_reloads_with_its_logits(family, tmp_path, token_batch):
    """config.json records each layer's heads, KV groups and MLP width; `load_model` rebuilds the model from them
    and the tensors (no checkpoint code), with the same logits; plain from_pretrained refuses it."""
    from transformers import AutoModelForCausalLM

    from compactlm.models.layer_shapes import LAYERS_KEY
    from compactlm.models.loading import load_model, write_checkpoint

    model = tiny_model(family, 4, 2, layers=3)
    _, source, _, plan = _plan(model)
    pruned = prune_model(model, plan)
    write_checkpoint(pruned, None, tmp_path)
    records = json.loads((tmp_path / "config.json").read_text())[LAYERS_KEY]
    assert [r["ffn"] for r in records] == [len(plan.ffn[i]) for i in range(source.layers)]
    assert [r["kv_heads"] for r in records] == [len(plan.kv_heads[i]) for i in range(source.layers)]
    again = load_model(str(tmp_path))
    assert {n: p.shape for n, p in again.named_parameters()} == {n: p.shape for n, p in pruned.named_parameters()}
    # exact: the same tensors through the same class and kernels in one process
    torch.testing.assert_close(logits(again, token_batch), logits(pruned, token_batch), rtol=0, atol=0)
    with pytest.raises(Exception, match="(?i)size|shape"):  # never a silently different model
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_per_layer_checkpoint_missing_a_tensor_is_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    from compactlm.models.loading import load_model, write_checkpoint

    model = tiny_model("llama", 4, 2, layers=3)
    write_checkpoint(prune_model(model, _plan(model)[3]), None, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp.down_proj" not in k}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(CompactLMError, match="layers.1.mlp.down_proj"):
        load_model(str(tmp_path))
    save_file(tensors | {"model.layers.0.mlp.extra": torch.zeros(3)}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})  # a tensor the family's class has no place for: refused, not added
    with pytest.raises(CompactLMError, match="unexpected tensor model.layers.0.mlp.extra"):
        load_model(str(tmp_path))
