"""Importance scoring: aggregations against naive loops, hook hygiene, invariants on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILIES, MOE, VOCAB, model_params, tiny_model

from compactlm.errors import CompactLMError
from compactlm.importance import (
    AGGREGATIONS,
    activation_scores,
    aggregate,
    aggregate_sequence,
    block_importance,
    collect_activations,
    contiguous_block_losses,
    lm_loss,
    lm_loss_importance,
    magnitude_scores,
    random_scores,
    score,
)
from compactlm.models.family import family_of, get_module

HEAD_SCORES = ("paper", "channel")
DEFAULT_LAYOUT = {f: (4, 4) if f == "gpt2" else (4, 2) for f in FAMILIES}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core machine a 2-thread op can stall ~8 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# (B=4, S=4, C=2) with negatives; row 1 pads its tail, row 3 is all padding.
A = torch.tensor([
    [[1.0, -2.0], [3.0, 0.5], [-1.0, 4.0], [2.0, -1.0]],
    [[-2.0, 1.0], [0.0, 3.0], [9.0, 9.0], [-9.0, 9.0]],
    [[0.5, 0.5], [-0.5, 1.5], [2.5, -3.0], [1.0, 2.0]],
    [[7.0, 7.0], [7.0, 7.0], [7.0, 7.0], [7.0, 7.0]],
])
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])


def _naive_seq(values: list[float], how: str) -> float:
    n = len(values)
    if how == "mean":
        return sum(abs(v) for v in values) / n
    if how == "l2":
        return math.sqrt(sum(v * v for v in values))
    m = sum(values) / n
    return sum((v - m) ** 2 for v in values) / n


def _naive(a: torch.Tensor, mask: torch.Tensor, aggregation: str) -> list[float]:
    """Score per channel by plain Python loops; sequences without a real token are left out."""
    batch_how, seq_how = aggregation.split("_")
    out = []
    for c in range(a.shape[2]):
        rows = []
        for b in range(a.shape[0]):
            values = [float(a[b, t, c]) for t in range(a.shape[1]) if mask[b, t]]
            if values:
                rows.append(_naive_seq(values, seq_how))
        out.append(_naive_seq(rows, batch_how) if batch_how != "mean" else sum(rows) / len(rows))
    return out


def _with_padding(batch: dict, fill: int) -> dict:
    ids = batch["input_ids"].clone()
    ids[batch["attention_mask"] == 0] = fill
    return {"input_ids": ids, "attention_mask": batch["attention_mask"]}


def _all_hooks_empty(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------- aggregations


@pytest.mark.parametrize("how", ["mean", "l2", "var"])
def test_aggregate_sequence_matches_naive_loop(how):
    got = aggregate_sequence(A, MASK, how)
    assert got.dtype == torch.float32 and got.shape == (4, 2)
    for b in range(3):
        for c in range(2):
            values = [float(A[b, t, c]) for t in range(4) if MASK[b, t]]
            # float32 sums of <= 4 values against a float64 loop: a few roundings (eps 1.2e-7); measured 4e-8
            assert got[b, c].item() == pytest.approx(_naive_seq(values, how), rel=1e-6)
    assert torch.equal(got[3], torch.zeros(2))  # an all-padding row scores 0


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_nine_aggregations_match_naive_loop(aggregation):
    got = aggregate(A, MASK, aggregation)
    # float32, two levels (sequence, then Chan's merge over rows) against a float64 loop: measured 1.7e-7 relative.
    # abs: a batch variance's rounding scales with the squared scores (~10, eps x 10 ~ 1e-6), not with the variance
    assert got.tolist() == pytest.approx(_naive(A, MASK, aggregation), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_padding_values_do_not_reach_the_aggregation(aggregation):
    noisy = torch.where(MASK.bool().unsqueeze(-1), A, torch.full_like(A, 1e4))
    assert torch.equal(aggregate(noisy, MASK, aggregation), aggregate(A, MASK, aggregation))


def test_bf16_activations_aggregate_in_float32():
    a = A.to(torch.bfloat16)
    for how in ("mean", "l2", "var"):
        assert aggregate_sequence(a, MASK, how).dtype == torch.float32


def test_unknown_names_raise_one_line_errors():
    model = tiny_model("llama")
    batch = {"input_ids": torch.randint(2, VOCAB, (1, 4))}
    for kwargs in ({"aggregation": "max_mean"}, {"head_score": "nope"}, {"method": "fisher"},
                   {"layer_metrics": ("perplexity",)}):
        with pytest.raises(CompactLMError) as err:
            score(model, [batch], **kwargs)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- activation scores on tiny models


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_dtypes_and_meta(family, token_batch):
    heads, kv = DEFAULT_LAYOUT[family]
    model = tiny_model(family, heads, kv)
    s = score(model, [token_batch])
    d = family_of(model).dims(model.config)
    assert s.hidden.shape == (d.hidden,) and s.heads.shape == (d.layers, d.heads)
    assert s.ffn.shape == ((d.layers, d.experts, d.ffn) if d.experts else (d.layers, d.ffn))
    assert set(s.experts) == ({"reap_sum", "reap", "frequency"} if d.experts else set())
    assert all(v.shape == (d.layers, d.experts) and v.dtype == torch.float32 for v in s.experts.values())
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in (s.hidden, s.heads, s.ffn))
    assert set(s.layers) == {"lm_loss", "block_importance"}
    assert all(v.shape == (d.layers,) for v in s.layers.values())
    assert s.meta == {"method": "activation", "aggregation": "l2_mean", "head_score": "paper"}
    assert not model.training


@pytest.mark.parametrize("family", FAMILIES)
def test_two_batches_equal_one_concatenated_batch(family, token_batch):
    heads, kv = DEFAULT_LAYOUT[family]
    model = tiny_model(family, heads, kv)
    first = {k: v[:1] for k, v in token_batch.items()}
    rest = {k: v[1:] for k, v in token_batch.items()}
    for aggregation in AGGREGATIONS:
        for head_score in HEAD_SCORES:
            one = activation_scores(model, [token_batch], aggregation=aggregation, head_score=head_score)
            two = activation_scores(model, [first, rest], aggregation=aggregation, head_score=head_score)
            for x, y in ((one.hidden, two.hidden), (one.heads, two.heads), (one.ffn, two.ffn)):
                # forwards of 1 + 2 rows vs 3 round differently in float32 (~1e-7 per op, 3 layers), and the var
                # aggregations cancel (variance of close per-sequence scores): measured 2.4e-5 relative on the
                # smallest scores, 1.2% of this bound
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_token_ids_do_not_change_any_score(family, token_batch):
    heads, kv = DEFAULT_LAYOUT[family]
    model = tiny_model(family, heads, kv)
    for head_score in HEAD_SCORES:
        kwargs = {"head_score": head_score, "aggregation": "var_var"}
        a = score(model, [_with_padding(token_batch, 5)], **kwargs)
        b = score(model, [_with_padding(token_batch, VOCAB - 1)], **kwargs)
        for x, y in [(a.hidden, b.hidden), (a.heads, b.heads), (a.ffn, b.ffn)] + [
            (a.layers[k], b.layers[k]) for k in a.layers
        ]:
            # same shapes and operations; padded keys get exactly zero attention and padded positions zero
            # aggregation weight: measured equal, the bound a float32 margin
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_hooks_remain_after_scoring_or_an_exception(family, token_batch):
    heads, kv = DEFAULT_LAYOUT[family]
    model = tiny_model(family, heads, kv)
    score(model, [token_batch], head_score="channel")
    contiguous_block_losses(model, [token_batch], 2)
    assert _all_hooks_empty(model)
    with pytest.raises(RuntimeError, match="boom"):
        with collect_activations(model, family_of(model)) as collector:
            collector.set_mask(token_batch["attention_mask"])
            model(**token_batch)
            raise RuntimeError("boom")
    assert _all_hooks_empty(model)


@pytest.mark.parametrize("family,heads,kv_heads,tied", model_params())
def test_scoring_does_not_change_model_outputs(family, heads, kv_heads, tied, token_batch):
    model = tiny_model(family, heads, kv_heads, tied)
    with torch.no_grad():
        expected = model(**token_batch).logits
        for aggregation in ("l2_mean", "var_var", "mean_l2"):
            with collect_activations(model, family_of(model), aggregation, "paper") as collector:
                collector.set_mask(token_batch["attention_mask"])
                got = model(**token_batch).logits
            assert torch.equal(got, expected)


def _capture(model, path: str, layer: int, seen: list, *, output: bool = False):
    """Hook that appends the input (or output) of a per-layer module to `seen`; returns its handle."""
    block = get_module(model, family_of(model).layers_path)[layer]
    module = get_module(block, path)
    if output:
        return module.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    return module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))


def _l2_mean(a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, S, C) -> (C,) by explicit per-row means: sqrt(sum_b mean_t |a|^2)."""
    rows = [a[b, mask[b].bool()].abs().mean(0) for b in range(a.shape[0])]
    return torch.stack(rows).square().sum(0).sqrt()


@pytest.mark.parametrize("family,heads,kv_heads,tied", model_params())
def test_scores_equal_a_manual_computation(family, heads, kv_heads, tied, token_batch):
    model = tiny_model(family, heads, kv_heads, tied)
    fam, layer, mask = family_of(model), 1, token_batch["attention_mask"]
    attn, mlp, norms = [], [], [[] for _ in range(3 * len(fam.norm_paths))]
    handles = [_capture(model, fam.attn_out_path, layer, attn), _capture(model, fam.mlp_out_path, layer, mlp)]
    for k, (i, p) in enumerate((i, p) for i in range(3) for p in fam.norm_paths):
        handles.append(_capture(model, p, i, norms[k], output=True))
    with torch.no_grad():
        model(**token_batch)
    for handle in handles:
        handle.remove()
    got = activation_scores(model, [token_batch])
    B, S, _ = attn[0].shape
    per_token = attn[0].view(B, S, heads, -1).norm(dim=-1)  # (B, S, heads): paper head score
    torch.testing.assert_close(got.heads[layer], _l2_mean(per_token, mask))
    if not fam.moe:  # experts: test_moe.py computes their scores token by token
        torch.testing.assert_close(got.ffn[layer], _l2_mean(mlp[0], mask))
    torch.testing.assert_close(got.hidden, sum(_l2_mean(n[0], mask) for n in norms))
    channel = activation_scores(model, [token_batch], head_score="channel")
    torch.testing.assert_close(channel.heads[layer], _l2_mean(attn[0], mask).view(heads, -1).norm(dim=-1))


def _zero_value_head(model, layer: int, kv_head: int) -> None:
    family, d = family_of(model), family_of(model).dims(model.config)
    block = get_module(model, family.layers_path)[layer]
    cols = slice(kv_head * d.head_dim, (kv_head + 1) * d.head_dim)
    with torch.no_grad():
        if family.name == "gpt2":  # Conv1D c_attn: (hidden, [q | k | v])
            v = slice(2 * d.hidden + cols.start, 2 * d.hidden + cols.stop)
            block.attn.c_attn.weight[:, v] = 0
            block.attn.c_attn.bias[v] = 0
        elif family.name == "phi3":  # fused qkv_proj rows: [q | k | v]
            v = (d.heads + d.kv_heads) * d.head_dim
            block.self_attn.qkv_proj.weight[v + cols.start: v + cols.stop] = 0
        else:
            block.self_attn.v_proj.weight[cols] = 0
            if block.self_attn.v_proj.bias is not None:
                block.self_attn.v_proj.bias[cols] = 0


@pytest.mark.parametrize("family,heads,kv_heads,tied", model_params())
def test_a_head_with_zero_values_scores_zero(family, heads, kv_heads, tied, token_batch):
    model = tiny_model(family, heads, kv_heads, tied)
    _zero_value_head(model, layer=1, kv_head=1)
    group = heads // kv_heads  # query heads sharing KV head 1: all their outputs are 0
    dead = torch.zeros(heads, dtype=torch.bool)
    dead[group: 2 * group] = True
    for head_score in HEAD_SCORES:
        for aggregation in ("l2_mean", "mean_var", "var_l2"):
            s = activation_scores(model, [token_batch], aggregation=aggregation, head_score=head_score)
            assert torch.all(s.heads[1, dead] == 0)
            assert torch.all(s.heads[1, ~dead] > 0) and torch.all(s.heads[[0, 2]] > 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_mlp_neuron_with_zero_input_weights_scores_zero(family, token_batch):
    heads, kv = DEFAULT_LAYOUT[family]
    model = tiny_model(family, heads, kv)
    block = get_module(model, family_of(model).layers_path)[2]
    with torch.no_grad():
        if family == "gpt2":  # gelu(0) = 0: column of Conv1D c_fc and its bias
            block.mlp.c_fc.weight[:, 7] = 0
            block.mlp.c_fc.bias[7] = 0
        elif family == "phi3":  # fused gate_up_proj rows: [gate | up]
            block.mlp.gate_up_proj.weight[block.mlp.down_proj.in_features + 7] = 0
        elif family in MOE:  # expert 1's [gate | up] rows
            block.mlp.experts.gate_up_proj[1, block.mlp.experts.down_proj.shape[-1] + 7] = 0
        else:  # act(gate) * 0 = 0
            block.mlp.up_proj.weight[7] = 0
    for aggregation in AGGREGATIONS:
        s = activation_scores(model, [token_batch], aggregation=aggregation)
        ffn = s.ffn[2, 1] if family in MOE else s.ffn[2]  # the neurons of expert 1 (routed some tokens)
        assert ffn[7] == 0
        assert (ffn > 0).sum() == len(ffn) - 1


# ---------------------------------------------------------------- depth metrics


def _make_identity_layer(model, layer: int) -> None:
    """Zero a layer's attention and MLP output projections (weights and biases): it then returns its input."""
    family = family_of(model)
    block = get_module(model, family.layers_path)[layer]
    with torch.no_grad():
        for path in (family.attn_out_path, family.mlp_out_path):
            proj = get_module(block, path)
            (proj.down_proj if family.moe and path == family.mlp_out_path else proj.weight).zero_()  # MoE: experts
            if getattr(proj, "bias", None) is not None:
                proj.bias.zero_()


@pytest.mark.parametrize("family", FAMILIES)
def test_an_identity_layer_has_zero_depth_importance(family, token_batch):
    heads, kv = DEFAULT_LAYOUT[family]
    model = tiny_model(family, heads, kv)
    _make_identity_layer(model, 1)
    bi = block_importance(model, [token_batch])
    loss = lm_loss_importance(model, [token_batch])
    assert bi.shape == loss.shape == (3,) and bi.dtype == loss.dtype == torch.float32
    # the identity layer adds exact zeros: 1 - cos(x, x) and the loss change measured exactly 0 (1e-5: a float32
    # margin); the real layers' BI measured >= 0.03
    assert abs(bi[1]) < 1e-5 and torch.all(bi[[0, 2]] > 1e-4)
    assert abs(loss[1]) < 1e-5
    assert block_importance(model, [token_batch], n=2).shape == (2,)
    assert _all_hooks_empty(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_contiguous_block_losses_with_one_layer_is_baseline_plus_importance(family, token_batch):
    heads, kv = DEFAULT_LAYOUT[family]
    model = tiny_model(family, heads, kv)
    batches = [{k: v[:2] for k, v in token_batch.items()}, {k: v[2:] for k, v in token_batch.items()}]
    base = lm_loss(model, batches)
    # token-weighted mean; forwards of 2 + 1 rows vs 3 round differently in float32 (the sums are float64):
    # measured 1.6e-7
    assert base == pytest.approx(lm_loss(model, [token_batch]), rel=1e-6)
    skipped = contiguous_block_losses(model, batches, 1)
    torch.testing.assert_close(skipped, base + lm_loss_importance(model, batches))
    blocks = contiguous_block_losses(model, batches, 3)  # every layer skipped: logits of the embeddings alone
    assert blocks.shape == (1,) and torch.isfinite(blocks).all()
    with pytest.raises(CompactLMError):
        contiguous_block_losses(model, batches, 4)


def test_block_importance_of_whole_model_matches_hidden_states(token_batch):
    """BI over n=layers compares the embeddings with the last layer's output (before the final norm)."""
    model = tiny_model("llama", layers=3)
    with torch.no_grad():
        hs = model(**token_batch, output_hidden_states=True).hidden_states
    last = get_module(model, "model.layers")[2]
    out = []
    handle = last.register_forward_hook(lambda m, a, o: out.append(o))
    with torch.no_grad():
        model(**token_batch)
    handle.remove()
    cos = torch.nn.functional.cosine_similarity(hs[0], out[0], dim=-1)
    mask = token_batch["attention_mask"].bool()
    expected = 1 - cos[mask].mean()
    torch.testing.assert_close(block_importance(model, [token_batch], n=3), expected.reshape(1))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_model_gives_finite_float32_scores(family, token_batch):
    heads, kv = DEFAULT_LAYOUT[family]
    model = tiny_model(family, heads, kv).to(torch.bfloat16)
    for head_score in HEAD_SCORES:
        s = score(model, [token_batch], head_score=head_score, aggregation="var_var")
        for t in (s.hidden, s.heads, s.ffn, *s.layers.values()):
            assert t.dtype == torch.float32 and torch.isfinite(t).all()
    assert _all_hooks_empty(model)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_float64_model_scores_like_float32(family, token_batch):
    """Bug: the default head score called vector_norm(dtype=float32) on float64 activations and crashed."""
    heads, kv = DEFAULT_LAYOUT[family]
    model = tiny_model(family, heads, kv)
    want = score(model, [token_batch], layer_metrics=())
    got = score(model.double(), [token_batch], layer_metrics=())
    for a, b in ((got.hidden, want.hidden), (got.heads, want.heads), (got.ffn, want.ffn)):
        assert a.dtype == torch.float32
        # the float32 model's forward (eps 1.2e-7 per rounding, 3 layers) against float64, both aggregated in
        # float32: measured 7.7e-7 relative
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- baselines


@pytest.mark.parametrize("family", FAMILIES)
def test_random_and_magnitude_baselines(family):
    heads, kv = DEFAULT_LAYOUT[family]
    model = tiny_model(family, heads, kv)
    a, b, c = random_scores(model, 3), random_scores(model, 3), random_scores(model, 4)
    assert torch.equal(a.ffn, b.ffn) and not torch.equal(a.ffn, c.ffn) and set(a.layers) == {"random"}
    assert score(model, None, method="random", seed=3).meta["method"] == "random"
    fam = family_of(model)
    params = dict(model.named_parameters())
    d = fam.dims(model.config)
    with torch.no_grad():  # zero everything that reads or writes MLP neuron 5 of layer 0 (both halves of [gate | up])
        for suffix, axes in fam.layer_params.items():
            for label, rows in (("ffn", [5]), ("ffn2", [5, d.ffn + 5]), ("effn", [5]), ("effn2", [5, d.ffn + 5])):
                if label in axes and f"{fam.layers_path}.0.{suffix}" in params:  # MoE: neuron 5 of every expert
                    params[f"{fam.layers_path}.0.{suffix}"].index_fill_(axes.index(label), torch.tensor(rows), 0.0)
    m = magnitude_scores(model)
    assert torch.all(m.ffn[0, ..., 5] == 0) and torch.all(m.ffn[0, ..., torch.arange(d.ffn) != 5] > 0)
    assert m.hidden.shape == (d.hidden,) and m.heads.shape == (d.layers, d.heads) and torch.all(m.heads > 0)
    assert set(m.layers) == {"magnitude"} and m.layers["magnitude"].shape == (d.layers,)
    if fam.moe:  # an expert's weights and router row
        assert set(m.experts) == set(a.experts) - {"random"} | {"magnitude"} and torch.all(m.experts["magnitude"] > 0)
        assert m.ffn.shape == a.ffn.shape == (d.layers, d.experts, d.ffn) and a.experts["random"].shape == (d.layers, d.experts)


# ---------------------------------------------------------------- output-aware and Taylor


@pytest.mark.parametrize("family", FAMILIES)
def test_output_aware_scores_weight_each_unit_by_its_outgoing_weights(family, token_batch):
    heads, kv = DEFAULT_LAYOUT[family]
    model = tiny_model(family, heads, kv)
    fam = family_of(model)
    d = fam.dims(model.config)
    if fam.moe:
        with pytest.raises(CompactLMError, match="importance.method=output_aware does not handle mixtures of experts"):
            score(model, [token_batch], method="output_aware", layer_metrics=())
        return
    plain = activation_scores(model, [token_batch])
    aware = score(model, [token_batch], method="output_aware", layer_metrics=())
    assert aware.meta["method"] == "output_aware"
    layers = get_module(model, fam.layers_path)
    for i in range(d.layers):
        w = get_module(layers[i], fam.mlp_out_path).weight.detach()
        columns = w.norm(dim=0 if family != "gpt2" else 1)  # a neuron's down_proj column (Conv1D: its row)
        torch.testing.assert_close(aware.ffn[i], plain.ffn[i] * columns)
        w = get_module(layers[i], fam.attn_out_path).weight.detach()
        per_head = (w if family != "gpt2" else w.T).reshape(-1, d.heads, d.head_dim).square().sum((0, 2)).sqrt()
        torch.testing.assert_close(aware.heads[i], plain.heads[i] * per_head)
    assert aware.hidden.shape == (d.hidden,) and torch.all(aware.hidden > 0)
    with torch.no_grad():  # a channel that no projection reads scores 0, however large its activations
        for i in range(d.layers):
            for paths in fam.reads():
                for path in paths:
                    w = get_module(layers[i], path).weight
                    (w[3] if family == "gpt2" else w[:, 3]).zero_()
    unread = activation_scores(model, [token_batch], output_aware=True).hidden[3]
    if None in fam.norm_reads:  # post-norms (Gemma, OLMo 2) write the residual stream: weight 1, their score stays
        assert unread > 0
        if set(fam.norm_reads) == {None}:
            torch.testing.assert_close(aware.hidden, plain.hidden)
    else:
        assert unread == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_taylor_scores_zero_for_units_nothing_reads(family, token_batch):
    """A neuron whose down_proj column is zero has a zero gradient, so its first-order removal cost is 0; the
    weights get no gradient and keep their requires_grad."""
    heads, kv = DEFAULT_LAYOUT[family]
    model = tiny_model(family, heads, kv)
    fam = family_of(model)
    d = fam.dims(model.config)
    if fam.moe:
        with pytest.raises(CompactLMError, match="importance.method=taylor does not handle mixtures of experts"):
            score(model, [token_batch], method="taylor", layer_metrics=())
        return
    with torch.no_grad():
        w = get_module(model, f"{fam.layers_path}.1.{fam.mlp_out_path}").weight
        (w[5] if family == "gpt2" else w[:, 5]).zero_()
    model.lm_head.weight.requires_grad_(False)
    scores = score(model, [token_batch], method="taylor", layer_metrics=())
    assert scores.meta["method"] == "taylor"
    assert scores.ffn.shape == (d.layers, d.ffn) and scores.heads.shape == (d.layers, d.heads)
    assert scores.ffn[1, 5] == 0 and (scores.ffn[1] > 0).sum() == d.ffn - 1
    assert torch.all(scores.heads > 0) and torch.all(scores.hidden > 0)
    assert all(p.grad is None for p in model.parameters())
    assert not model.lm_head.weight.requires_grad and get_module(model, fam.embed_path).weight.requires_grad
    assert _all_hooks_empty(model)


def test_taylor_matches_autograd_on_one_site(token_batch):
    """The per-sequence |sum_t a * dL/da| of layer 0's MLP neurons, computed again by hand with autograd."""
    model = tiny_model("llama", 4, 2)
    fam = family_of(model)
    down = get_module(model, f"{fam.layers_path}.0.{fam.mlp_out_path}")
    seen = {}

    def keep(module, args):
        args[0].retain_grad()
        seen["a"] = args[0]

    handle = down.register_forward_pre_hook(keep)
    mask = token_batch["attention_mask"]
    labels = token_batch["input_ids"].masked_fill(mask == 0, -100)
    model(**token_batch, labels=labels).loss.backward()
    handle.remove()
    a, g = seen["a"].detach(), seen["a"].grad
    expected = ((a * g) * mask[..., None]).sum(1).abs().sum(0) / 3  # three sequences
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(score(model, [token_batch], method="taylor", layer_metrics=()).ffn[0], expected)
