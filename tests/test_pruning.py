"""Surgery invariants: keep-all is identity, pruning zeroed units changes nothing, reload keeps logits."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import MOE, ffn_key, model_params, positive_scores, tiny_model
from transformers import AutoModelForCausalLM

from compactlm.config import TargetConfig
from compactlm.errors import CompactLMError
from compactlm.importance.scores import Scores
from compactlm.models.family import family_of, get_module
from compactlm.pruning import head_channels, keep_all, make_plan, prune_model, resolve_target


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def scores_for(model, seed: int = 0) -> Scores:
    """Random positive scores of the right shapes."""
    return positive_scores(model, seed=seed)


def zero_columns_(weight: torch.Tensor, channels: torch.Tensor, conv1d: bool) -> None:
    """Zero the input channels of a projection (rows of a Conv1D weight, columns of a Linear weight)."""
    with torch.no_grad():
        if conv1d:
            weight[channels] = 0.0
        else:
            weight[:, channels] = 0.0


def zero_neurons_(model, scores: Scores, count: int):
    """Zero `count` random MLP neurons of every layer (of every expert, in a mixture of experts): their output
    columns and their scores. Returns the target shape that prunes exactly them."""
    fam = family_of(model)
    dims = fam.dims(model.config)
    for layer in range(dims.layers):
        mlp_out = get_module(model, f"{fam.layers_path}.{layer}.{fam.mlp_out_path}")
        for e in range(dims.experts) if fam.moe else (None,):  # a mixture of experts: other neurons in each expert
            dead = torch.randperm(dims.ffn)[:count]
            if e is None:
                scores.ffn[layer, dead] = 0.0
                zero_columns_(mlp_out.weight, dead, conv1d=fam.name == "gpt2")
            else:
                scores.ffn[layer, e, dead] = 0.0
                zero_columns_(mlp_out.down_proj[e], dead, conv1d=False)
    return resolve_target(TargetConfig(**{ffn_key(fam): dims.ffn - count}), dims, fam)


def copy_pruned_heads_(model, fam, layer: int, plan, dims) -> None:
    """OLMo 2 normalises q and k over all heads at once: a pruned head still counts in that mean square unless it
    equals a kept one. Copy the kept heads' q (and k) rows into the pruned ones (half of them each), so the norm's
    mean square, and so every kept head's output, is the same with and without the pruned heads."""
    for name, keep, count in (("q_proj", plan.heads[layer], dims.heads), ("k_proj", plan.kv_heads[layer], dims.kv_heads)):
        dead = torch.tensor(sorted(set(range(count)) - set(keep.tolist())), dtype=torch.long)
        if len(dead) == 0:
            continue
        assert len(dead) == len(keep)
        weight = get_module(model, f"{fam.layers_path}.{layer}.self_attn.{name}").weight
        with torch.no_grad():
            weight[head_channels(dead, dims.head_dim)] = weight[head_channels(keep, dims.head_dim)]


@pytest.mark.parametrize("family,heads,kv,tied", model_params())
def test_keep_all_plan_is_identity(family, heads, kv, tied, token_batch):
    model = tiny_model(family, heads, kv, tied)
    dims = family_of(model).dims(model.config)
    pruned = prune_model(model, keep_all(dims))
    # exact: the same float32 weights, the same operations in the same order
    torch.testing.assert_close(logits(pruned, token_batch), logits(model, token_batch), rtol=0, atol=0)
    # built on the meta device, the pruned model holds real tensors of its own: none is meta, none is the source's
    source = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    tensors = [*pruned.parameters(), *pruned.buffers()]
    assert not any(t.is_meta for t in tensors)
    assert not any(t.untyped_storage().data_ptr() in source for t in tensors)


@pytest.mark.parametrize("family,heads,kv,tied", model_params())
def test_pruning_zeroed_neurons_changes_nothing(family, heads, kv, tied, token_batch):
    model = tiny_model(family, heads, kv, tied)
    fam = family_of(model)
    dims = fam.dims(model.config)
    scores = scores_for(model)
    target = zero_neurons_(model, scores, dims.ffn // 3)
    pruned = prune_model(model, make_plan(scores, dims, target, drop_layers=[]))
    assert fam.dims(pruned.config).ffn == dims.ffn - dims.ffn // 3
    # the zeroed neurons added exact zeros, but a narrower down projection (32 wide, not 48) sums in another order:
    # float32 rounding (eps 1.2e-7) of logits |x| < 1, 3 layers deep; measured <= 1.2e-7
    torch.testing.assert_close(logits(pruned, token_batch), logits(model, token_batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,heads,kv,tied", model_params())
def test_pruning_zeroed_heads_changes_nothing(family, heads, kv, tied, token_batch):
    """Half the query heads: inside each KV group when it has 2+ heads, else whole KV groups."""
    if family == "gpt2":
        pytest.skip("GPT-2 ties hidden to heads x head_dim: heads cannot shrink alone (covered by the reload test)")
    model = tiny_model(family, heads, kv, tied)
    fam = family_of(model)
    dims = fam.dims(model.config)
    new_kv = kv if dims.groups >= 2 else kv // 2
    target = resolve_target(TargetConfig(num_attention_heads=heads // 2, num_key_value_heads=new_kv), dims, fam)
    scores = scores_for(model)
    plan = make_plan(scores, dims, target, drop_layers=[])
    for layer in range(dims.layers):
        dead = torch.tensor(sorted(set(range(heads)) - set(plan.heads[layer].tolist())))
        channels = head_channels(dead, dims.head_dim)
        attn_out = get_module(model, f"{fam.layers_path}.{layer}.{fam.attn_out_path}")
        zero_columns_(attn_out.weight, channels, conv1d=family == "gpt2")
        if family == "olmo2":
            copy_pruned_heads_(model, fam, layer, plan, dims)
    pruned = prune_model(model, plan)
    assert (fam.dims(pruned.config).heads, fam.dims(pruned.config).kv_heads) == (heads // 2, new_kv)
    # as for neurons: a narrower output projection sums in another order (float32, 3 layers); measured <= 9e-8
    torch.testing.assert_close(logits(pruned, token_batch), logits(model, token_batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,heads,kv,tied", model_params())
def test_dropping_a_zeroed_layer_changes_nothing(family, heads, kv, tied, token_batch):
    model = tiny_model(family, heads, kv, tied)
    fam = family_of(model)
    dims = fam.dims(model.config)
    with torch.no_grad():
        for path in (fam.attn_out_path, fam.mlp_out_path):
            module = get_module(model, f"{fam.layers_path}.1.{path}")
            experts = fam.moe and path == fam.mlp_out_path
            (module.down_proj if experts else module.weight).zero_()  # MoE: every expert's output
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    plan = dataclasses.replace(keep_all(dims), layers=torch.tensor([0, 2]))
    pruned = prune_model(model, plan)
    assert fam.dims(pruned.config).layers == 2
    # a zeroed layer adds exact zeros to the residual stream: measured equal; the float32 margin of the tests above
    torch.testing.assert_close(logits(pruned, token_batch), logits(model, token_batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,heads,kv,tied", model_params())
def test_pruned_model_reloads_with_plain_from_pretrained(family, heads, kv, tied, token_batch, tmp_path):
    model = tiny_model(family, heads, kv, tied)
    fam = family_of(model)
    dims = fam.dims(model.config)
    # hidden 24 with heads x head_dim = 32 for the explicit-head_dim families; GPT-2 needs hidden = heads x head_dim
    new_heads = heads if family != "gpt2" else 3
    experts = {fam.keys["experts"]: 3} if fam.moe else {}
    target = resolve_target(
        TargetConfig(hidden_size=24, num_attention_heads=new_heads, num_hidden_layers=2,
                     num_key_value_heads=None if family != "gpt2" else 3, **{ffn_key(fam): 0.5}, **experts),
        dims, fam,
    ) if family != "llama" else resolve_target(TargetConfig(hidden_size=24, intermediate_size=0.5, num_hidden_layers=2), dims, fam)
    pruned = prune_model(model, make_plan(scores_for(model), dims, target, drop_layers=[1]))
    pruned.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config
    if fam.explicit_head_dim:
        assert config["head_dim"] == dims.head_dim
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert fam.dims(reloaded.config) == target
    # exact: safetensors stores the float32 weights bit for bit and the reloaded model runs the same operations
    torch.testing.assert_close(logits(reloaded, token_batch), logits(pruned, token_batch), rtol=0, atol=0)
    if tied:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()


def test_pruning_does_not_change_the_source(token_batch):
    model = tiny_model("qwen3", 4, 2, False)
    before = logits(model, token_batch)
    dims = family_of(model).dims(model.config)
    target = resolve_target(TargetConfig(hidden_size=16, num_attention_heads=2, intermediate_size=16), dims, family_of(model))
    prune_model(model, make_plan(scores_for(model), dims, target, drop_layers=[0]))
    torch.testing.assert_close(logits(model, token_batch), before, rtol=0, atol=0)  # exact: the same forward again


@pytest.mark.parametrize(
    "family,target,message",
    [
        ("llama", TargetConfig(hidden_size=64), "larger than the source"),
        ("llama", TargetConfig(num_attention_heads=3), "not a multiple of"),
        ("llama", TargetConfig(drop_layers=(0, 1, 2)), "drops 3 of 3"),
        ("llama", TargetConfig(drop_layers=(7,)), "out of range"),
        ("llama", TargetConfig(hidden_size=30), "hidden_size % num_attention_heads"),
        ("gpt2", TargetConfig(hidden_size=24), "heads x head_dim"),
        ("mistral", TargetConfig(num_attention_heads=4, num_key_value_heads=1), "query heads per KV group"),
    ],
)
def test_bad_targets_name_the_key(family, target, message):
    model = tiny_model(family, 4, 2 if family != "gpt2" else 4)
    fam = family_of(model)
    with pytest.raises(CompactLMError, match=message):
        resolve_target(target, fam.dims(model.config), fam)


@pytest.mark.parametrize("override,message", [
    ("target.num_hidden_layers=0", "target.num_hidden_layers=0: must be at least 1"),
    ("target.intermediate_size=1.5", "target.intermediate_size=1.5: a fraction must lie in (0, 1] (the share to keep)"),
    ("target.drop_layers=[-1]", "target.drop_layers=[-1]: layer indices start at 0"),
])
def test_bad_target_values_fail_in_the_schema(override, message):
    from compactlm.config import load_config

    with pytest.raises(CompactLMError) as err:
        load_config(None, [override])
    assert str(err.value) == message


def test_fraction_and_rounding():
    model = tiny_model("mistral", 4, 2)
    fam = family_of(model)
    dims = fam.dims(model.config)
    target = resolve_target(TargetConfig(hidden_size=0.5, intermediate_size=0.7, round_to=8), dims, fam)
    assert (target.hidden, target.ffn) == (16, 32)


def test_unsupported_family_lists_supported():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, intermediate_size=32, vocab_size=32))
    supported = "llama, mistral, qwen2, qwen3, smollm3, gemma2, gemma3_text, phi3, olmo2, qwen3_moe, mixtral, gpt2"
    with pytest.raises(CompactLMError, match=f"supports {supported}"):
        family_of(model)


@pytest.mark.parametrize("reorder", [False, True])
def test_gpt2_depth_pruning_keeps_inverse_layer_index_scaling(reorder, token_batch):
    """Bug: with scale_attn_by_inverse_layer_idx a renumbered layer divided its scores by its new index."""
    model = tiny_model("gpt2", 4, 4, layers=4)
    model.config.scale_attn_by_inverse_layer_idx, model.config.reorder_and_upcast_attn = True, reorder
    model = AutoModelForCausalLM.from_config(model.config)  # rebuilt: the flag is read at construction
    model.load_state_dict(tiny_model("gpt2", 4, 4, layers=4).state_dict())
    model.eval()
    fam = family_of(model)
    with torch.no_grad():  # layer 1 becomes the identity: dropping it must change nothing
        for block in get_module(model, fam.layers_path):
            block.attn.c_attn.weight.mul_(30.0)  # sharp attention: at init scale, softmax is near uniform anyway
        for path in (fam.attn_out_path, fam.mlp_out_path):
            module = get_module(model, f"{fam.layers_path}.1.{path}")
            module.weight.zero_()
            module.bias.zero_()
    plan = keep_all(fam.dims(model.config))
    plan = type(plan)(plan.hidden, plan.heads, plan.kv_heads, plan.ffn, torch.tensor([0, 2, 3]))
    pruned = prune_model(model, plan)
    assert pruned.config.scale_attn_by_inverse_layer_idx
    # the moved layers' queries are rescaled by (j+1)/(i+1) in float32: one more rounding (~6e-8 relative) per
    # weight, through 30x sharpened attention and 3 layers; measured <= 9e-8 (logits |x| < 1)
    torch.testing.assert_close(logits(pruned, token_batch), logits(model, token_batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,heads", [("gpt2", 4), ("llama", 4)])
def test_heads_without_gqa_need_no_kv_target(family, heads, token_batch):
    """Bug: pruning heads of a model without GQA (every GPT-2) demanded target.num_key_value_heads."""
    model = tiny_model(family, heads, heads)
    fam = family_of(model)
    dims = fam.dims(model.config)
    hidden = 16 if family == "gpt2" else dims.hidden  # GPT-2: hidden = heads x head_dim
    target = resolve_target(TargetConfig(num_attention_heads=2, hidden_size=hidden), dims, fam)
    assert (target.heads, target.kv_heads) == (2, 2)
    pruned = prune_model(model, make_plan(scores_for(model), dims, target, drop_layers=[]))
    assert fam.dims(pruned.config).heads == 2 and torch.isfinite(logits(pruned, token_batch)).all()


def smaller_plan(model, drop: int):
    """A plan cutting every axis of a 3-layer tiny model: hidden 24 (GPT-2: 16 = 2 heads x 8), 2 heads, half
    the MLP, layer `drop` removed; keep indices from random scores."""
    fam = family_of(model)
    dims = fam.dims(model.config)
    hidden = 16 if fam.name == "gpt2" else 24
    experts = {fam.keys["experts"]: 3} if fam.moe else {}
    target = resolve_target(TargetConfig(hidden_size=hidden, num_attention_heads=2, num_hidden_layers=2,
                                         **{ffn_key(fam): 0.5}, **experts), dims, fam)
    return make_plan(scores_for(model), dims, target, drop_layers=[drop])


@pytest.mark.parametrize("family,heads,kv,tied", [("llama", 4, 2, False), ("gpt2", 4, 4, True)])
def test_plan_json_round_trip_rebuilds_the_same_model(family, heads, kv, tied, token_batch, tmp_path):
    """plan.json holds everything surgery needs: reading it back gives the same keep indices and logits."""
    from compactlm.pruning import Plan

    model = tiny_model(family, heads, kv, tied, layers=3)
    dims = family_of(model).dims(model.config)
    plan = smaller_plan(model, drop=1)
    plan.save(tmp_path / "plan.json", source="tiny")
    again = Plan.from_json(json.loads((tmp_path / "plan.json").read_text()), dims)
    assert torch.equal(again.hidden, plan.hidden) and torch.equal(again.layers, plan.layers)
    for layer in plan.layers.tolist():
        for axis in ("heads", "kv_heads", "ffn"):
            assert torch.equal(getattr(again, axis)[layer], getattr(plan, axis)[layer])
    torch.testing.assert_close(logits(prune_model(model, again), token_batch),  # exact: the same keep indices,
                               logits(prune_model(model, plan), token_batch), rtol=0, atol=0)  # so the same model


@pytest.mark.parametrize("metric", ["block_importance", "contiguous"])
def test_prune_to_is_the_whole_path_in_one_call(metric, token_batch):
    import compactlm
    from compactlm.importance import score
    from compactlm.importance.layers import with_depth_metrics
    from compactlm.config import PruneConfig
    from compactlm.pruning import layers_to_drop
    from compactlm.pruning.reconstruct import reconstruct

    model = tiny_model("llama", 4, 2, layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = compactlm.TargetConfig(hidden_size=24, intermediate_size=0.5, num_hidden_layers=2, layer_metric=metric)
    pruned = compactlm.prune_to(model, target, [token_batch])
    fam = family_of(model)
    dims = fam.dims(model.config)
    want = resolve_target(target, dims, fam)
    assert fam.dims(pruned.config) == want
    scores = score(model, [token_batch], layer_metrics=())  # the same path by hand
    scores = with_depth_metrics(model, [token_batch], scores, ["contiguous_1" if metric == "contiguous" else metric])
    plan = make_plan(scores, dims, want, layers_to_drop(target, dims, 2, scores))
    manual = prune_model(model, plan)
    reconstruct(model, manual, plan, [token_batch])  # the default refit (prune.reconstruct)
    # exact: the same scores, plan and refit, the same operations in the same order
    torch.testing.assert_close(logits(pruned, token_batch), logits(manual, token_batch), rtol=0, atol=0)
    torch.testing.assert_close(model.state_dict(), before)  # pure: the source model is unchanged
    sliced = compactlm.prune_to(model, target, [token_batch], prune=PruneConfig(reconstruct="none"))
    unfitted = prune_model(model, plan)
    torch.testing.assert_close(logits(sliced, token_batch), logits(unfitted, token_batch), rtol=0, atol=0)  # same


@pytest.mark.parametrize("family,heads,kv,tied", [p for p in model_params()
                                                 if p.values[1:3] in ((4, 2), (4, 4)) and p.values[0] not in MOE])
def test_streamed_surgery_equals_the_in_memory_one(family, heads, kv, tied, token_batch, tmp_path, monkeypatch):
    """Pruning a checkpoint on disk tensor by tensor into shards gives exactly the in-memory pruned model."""
    from compactlm.pruning import stream
    from compactlm.pruning.stream import INDEX, prune_checkpoint

    monkeypatch.setattr(stream, "CHUNK_BYTES", 1000)  # embeddings and head go in blocks of a few rows

    model = tiny_model(family, heads, kv, tied, layers=3)
    if family == "gpt2":
        model.config.scale_attn_by_inverse_layer_idx = True
        model = AutoModelForCausalLM.from_config(model.config).eval()
    model.save_pretrained(tmp_path / "src", max_shard_size="20KB")  # several source shards
    plan = smaller_plan(model, drop=0)
    prune_checkpoint(tmp_path / "src", plan, tmp_path / "out", max_shard_bytes=8_000)
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1  # written as several shards
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    in_memory = prune_model(model, plan)
    want = in_memory.state_dict()
    got = streamed.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # exact: bit-identical weights (just checked) run through the same operations
    torch.testing.assert_close(logits(streamed, token_batch), logits(in_memory, token_batch), rtol=0, atol=0)


@pytest.mark.parametrize("family,tied", [("gemma2", True), ("gemma3", True), ("gemma3", False)])
def test_gemma_embedding_scale_survives_hidden_pruning(family, tied, token_batch):
    """Gemma multiplies the embedding by sqrt(hidden_size): pruned to fewer channels, the kept channels still
    enter the layers with their values, and a tied LM head (through the final norm's 1 + w) gives the same
    logits for the same normalised state."""
    model = tiny_model(family, 4, 2, tied)
    fam = family_of(model)
    dims = fam.dims(model.config)
    target = resolve_target(TargetConfig(hidden_size=20), dims, fam)
    plan = make_plan(scores_for(model), dims, target, drop_layers=[])
    pruned = prune_model(model, plan)
    ids = token_batch["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(pruned.get_input_embeddings()(ids), model.get_input_embeddings()(ids)[..., plan.hidden])
        gain = lambda m: (1.0 + m.model.norm.weight)[:, None] * m.lm_head.weight.T  # noqa: E731  (H, V)
        torch.testing.assert_close(gain(pruned), gain(model)[plan.hidden])
