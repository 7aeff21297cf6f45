"""Architecture search: exact parameter counts, candidate grids, ranking by zero-shot or distilled loss."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import model_params, positive_scores, tiny_model

from compactlm.config import SearchConfig, TargetConfig
from compactlm.errors import CompactLMError
from compactlm.metrics import perplexity
from compactlm.importance.scores import Scores
from compactlm.models.family import Dims, family_of
from compactlm.models.params import num_params
from compactlm.pruning import keep_all, layers_to_drop, make_plan, prune_model
from compactlm.arch_search import (
    Candidate,
    enumerate_candidates,
    measure_latency,
    named_shapes,
    param_count,
    search,
    write_table,
)


def scores_for(model, seed: int = 0) -> Scores:
    """Random positive width scores and both depth metrics, of the model's shapes."""
    return positive_scores(model, ("block_importance", "lm_loss"), seed)


def half_dims(source: Dims, family: str) -> Dims:
    """Half the heads (in half the KV groups where there are several), fewer layers, hidden and ffn (and
    experts, with their width, for a mixture of experts)."""
    heads = source.heads // 2
    kv = heads if family == "gpt2" else max(1, source.kv_heads // 2)
    hidden = heads * source.head_dim if family == "gpt2" else 16
    if source.experts:
        return Dims(hidden, 16, heads, kv, source.head_dim, source.layers - 1, source.vocab, 3, source.top_k)
    return Dims(hidden, 24, heads, kv, source.head_dim, source.layers - 1, source.vocab)


@pytest.mark.parametrize("family,heads,kv,tied", model_params())
def test_param_count_matches_pruned_model(family, heads, kv, tied):
    model = tiny_model(family, heads, kv, tied)
    fam = family_of(model)
    source = fam.dims(model.config)
    assert param_count(model, fam, source) == num_params(model)
    target = half_dims(source, family)
    pruned = prune_model(model, make_plan(scores_for(model), source, target, drop_layers=[0]))
    assert fam.dims(pruned.config) == target
    assert param_count(model, fam, target) == num_params(pruned)
    assert param_count(named_shapes(model), fam, target) == num_params(pruned)  # names and shapes suffice


def test_param_count_rejects_undescribed_weights():
    model = tiny_model("llama")
    shapes = named_shapes(model) | {"model.extra.weight": (4, 4)}
    with pytest.raises(CompactLMError, match="model.extra.weight"):
        param_count(shapes, family_of(model), family_of(model).dims(model.config))


@pytest.mark.parametrize("family,heads,kv",
                         [("llama", 4, 2), ("qwen2", 4, 1), ("qwen3", 4, 4), ("gpt2", 4, 4)])
def test_candidates_within_tolerance_sorted_and_valid(family, heads, kv):
    model = tiny_model(family, heads, kv)
    fam = family_of(model)
    source = fam.dims(model.config)
    cfg = SearchConfig(target_params=0.5, tolerance=0.2, max_candidates=100)
    cands = enumerate_candidates(model, cfg)
    target = round(0.5 * num_params(model))
    assert cands
    gaps = [abs(c.params - target) for c in cands]
    assert gaps == sorted(gaps) and max(gaps) <= 0.2 * target
    assert len({c.dims for c in cands}) == len(cands)
    for c in cands:
        d = c.dims
        fam.check(d)
        assert d.hidden <= source.hidden and d.ffn <= source.ffn and d.layers <= source.layers
        assert d.heads <= source.heads and d.kv_heads <= source.kv_heads and d.heads % d.kv_heads == 0
        assert d.groups <= source.groups and d.head_dim == source.head_dim
        if family in ("llama", "gpt2"):
            assert d.hidden % d.heads == 0
        if family == "gpt2":
            assert d.hidden == d.heads * d.head_dim and d.kv_heads == d.heads
        assert c.params == param_count(model, fam, d)
    assert len(enumerate_candidates(model, dataclasses.replace(cfg, max_candidates=2))) == min(2, len(cands))


def test_candidates_from_explicit_grids():
    model = tiny_model("llama", 4, 2)
    fam = family_of(model)
    full = num_params(model)
    cfg = SearchConfig(target_params=full, tolerance=0.0, layers=(3,), heads=(4,), hidden=(32,), ffn=(48,))
    (only,) = enumerate_candidates(model, cfg)
    assert only.dims == fam.dims(model.config) and only.params == full
    # a grid larger than the teacher, or heads not divisible by kv_heads, yields nothing usable
    cfg = SearchConfig(target_params=full, layers=(3,), heads=(3,), hidden=(32, 64), ffn=(48,))
    with pytest.raises(CompactLMError, match="search grids"):
        enumerate_candidates(model, cfg)


@pytest.mark.parametrize("value,match", [(10, "closest has"), (None, "not set"), (1.5, "fraction")])
def test_no_candidate_error_is_one_line(value, match):
    from compactlm.config import Config, load_config

    model = tiny_model("llama")
    with pytest.raises(CompactLMError, match=match) as err:  # 1.5 fails in the schema, before any model loads
        cfg = load_config(None, [f"search.target_params={value}"]) if value is not None else Config()
        enumerate_candidates(model, cfg.search)
    assert "search.target_params" in str(err.value) and "\n" not in str(err.value)


def test_search_zero_shot_matches_manual_pruning(token_batch):
    """Each zero-shot loss equals pruning the same shape by hand from the same scores."""
    torch.manual_seed(0)
    model = tiny_model("qwen2", 4, 2)
    fam = family_of(model)
    source = fam.dims(model.config)
    scores = scores_for(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SearchConfig(target_params=0.5, tolerance=0.25, max_candidates=4)
    chosen, ranked = search(model, scores, cfg, [token_batch], layer_metric="lm_loss")
    assert [c.rank for c in ranked] == list(range(1, len(ranked) + 1)) and chosen == ranked[0]
    losses = [c.zero_shot_loss for c in ranked]
    assert losses == sorted(losses) and all(c.distilled_loss is None for c in ranked)
    for cand in ranked:
        drop = layers_to_drop(TargetConfig(layer_metric="lm_loss"), source, cand.dims.layers, scores)
        student = prune_model(model, make_plan(scores, source, cand.dims, drop))
        assert num_params(student) == cand.params
        # search ran this same prune_model + perplexity: the same operations, measured equal; 1e-6 a margin
        assert perplexity(student, [token_batch])["loss"] == pytest.approx(cand.zero_shot_loss, abs=1e-6)
    for key, value in model.state_dict().items():  # the teacher is untouched
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)  # exact: nothing may write to it


def test_search_teacher_shape_keeps_teacher_loss(token_batch):
    model = tiny_model("gpt2", 4, 4, tied=True)
    cfg = SearchConfig(target_params=1.0, tolerance=0.0, layers=(3,), heads=(4,), hidden=(32,), ffn=(48,))
    chosen, _ = search(model, scores_for(model), cfg, [token_batch])
    # a keep-all plan is the teacher bit for bit (test_pruning): measured equal; 1e-6 a margin
    assert chosen.zero_shot_loss == pytest.approx(perplexity(model, [token_batch])["loss"], abs=1e-6)
    dims = family_of(model).dims(model.config)
    assert num_params(prune_model(model, keep_all(dims))) == chosen.params


def test_search_picks_by_distilled_loss(token_batch):
    """A fake distillation that reverses the zero-shot order decides the choice among the top_k."""
    model = tiny_model("llama", 4, 2)
    fam = family_of(model)
    scores = scores_for(model)
    cfg = SearchConfig(target_params=0.5, tolerance=0.3, max_candidates=6, top_k=3)
    calls = []

    def distill_fn(students) -> list[float]:
        calls.extend(fam.dims(s.config) for s in students)
        return [-perplexity(s, [token_batch])["loss"] for s in students]

    _, zero_shot = search(model, scores, cfg, [token_batch])
    assert len(zero_shot) >= 3 and len({c.zero_shot_loss for c in zero_shot[:3]}) == 3
    chosen, ranked = search(model, scores, cfg, [token_batch], distill_fn=distill_fn)
    assert calls == [c.dims for c in zero_shot[:3]]  # the best three zero-shot, each pruned afresh
    assert chosen.dims == zero_shot[2].dims
    assert chosen.distilled_loss == min(c.distilled_loss for c in ranked[:3])
    assert [c.dims for c in ranked[:3]] == [c.dims for c in zero_shot[2::-1]]
    assert [c.dims for c in ranked[3:]] == [c.dims for c in zero_shot[3:]]
    assert all(c.distilled_loss is None for c in ranked[3:])
    no_distill = SearchConfig(target_params=0.5, tolerance=0.3, max_candidates=6, top_k=0)
    chosen, _ = search(model, scores, no_distill, [token_batch], distill_fn=distill_fn)
    assert chosen.dims == zero_shot[0].dims


def test_search_missing_layer_metric_fails_before_pruning(token_batch):
    model = tiny_model("llama", 4, 2)
    cfg = SearchConfig(target_params=0.5, tolerance=0.3)
    with pytest.raises(CompactLMError, match="contiguous"):
        search(model, scores_for(model), cfg, [token_batch], layer_metric="contiguous")


def test_measure_latency_positive():
    model = tiny_model("qwen3", 4, 2)
    fam = family_of(model)
    dims = half_dims(fam.dims(model.config), "qwen3")
    assert measure_latency(model.config, dims, fam, "cpu", seq_len=16, repeats=2) > 0


def test_latency_filter(token_batch):
    """A generous limit keeps every candidate and records its latency; an impossible one: a one-line error."""
    model = tiny_model("llama", 4, 2)
    scores = scores_for(model)
    base = dict(target_params=0.5, tolerance=0.3, max_candidates=3)
    _, ranked = search(model, scores, SearchConfig(**base, max_latency_ms=1e6), [token_batch])
    assert len(ranked) == len(enumerate_candidates(model, SearchConfig(**base)))
    assert all(c.latency_ms is not None and c.latency_ms > 0 for c in ranked)
    with pytest.raises(CompactLMError, match="search.max_latency_ms") as err:
        search(model, scores, SearchConfig(**base, max_latency_ms=1e-9), [token_batch])
    assert "\n" not in str(err.value)


def test_write_table(tmp_path):
    dims = [Dims(16, 24, 2, 1, 8, 2, 64), Dims(24, 36, 4, 2, 8, 3, 64)]
    cands = [Candidate(dims[0], 1000, None, 2.5, 2.1, 1), Candidate(dims[1], 1200, 0.7, 2.4, None, 2)]
    write_table(cands, cands[0], tmp_path / "search.md", tmp_path / "search.json")
    lines = (tmp_path / "search.md").read_text().splitlines()
    assert len(lines) == 2 + len(cands)
    assert "zero-shot loss" in lines[0] and "distilled loss" in lines[0] and "latency" in lines[0]
    assert "**yes**" in lines[2] and "**yes**" not in lines[3]
    assert "1,000" in lines[2] and "2.1000" in lines[2] and "0.7000" in lines[3]
    data = json.loads((tmp_path / "search.json").read_text())
    assert data["chosen"]["dims"]["hidden"] == 16 and len(data["candidates"]) == 2
    assert Candidate(Dims(**data["candidates"][1].pop("dims")), **data["candidates"][1]) == cands[1]


def test_search_command_with_contiguous_layer_metric(tiny_checkpoint, text_file, tmp_path, capsys):
    """Bug: `compactlm search target.layer_metric=contiguous` failed after scoring ("unknown layer metric")."""
    from compactlm.cli import main

    out = tmp_path / "search"
    code = main(["search", f"model={tiny_checkpoint}", f"data={text_file}", f"out_dir={out}",
                 "calib.sequences=4", "calib.seq_len=32", "calib.batch_size=4", "calib.layer_sequences=4",
                 "eval.seq_len=32", "eval.sequences=4", "search.target_params=0.75", "search.tolerance=0.3",
                 "search.layers=[2,3]", "search.top_k=0", "target.layer_metric=contiguous"])
    assert code == 0, capsys.readouterr().err
    table = json.loads((out / "search.json").read_text())["candidates"]
    assert {c["dims"]["layers"] for c in table} == {2, 3}
    assert all(c["zero_shot_loss"] is not None for c in table)


def test_reused_scores_of_another_head_count_fail_naming_the_file(tiny_checkpoint, text_file, tmp_path, capsys):
    """Bug: reused scores were checked without the heads shape; a wrong head count crashed later in a reshape."""
    from compactlm.cli import main

    from conftest import tiny_config

    cfg = tiny_config("llama", 4, 2)
    wrong = Scores(torch.rand(cfg.hidden_size), torch.rand(cfg.num_hidden_layers, 2),
                   torch.rand(cfg.num_hidden_layers, cfg.intermediate_size))
    wrong.save(tmp_path / "scores.safetensors")
    code = main(["prune", f"model={tiny_checkpoint}", f"data={text_file}", f"out_dir={tmp_path / 'out'}",
                 f"importance.scores={tmp_path / 'scores.safetensors'}", "target.num_attention_heads=2",
                 "calib.seq_len=32"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "importance.scores" in err and "heads" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
