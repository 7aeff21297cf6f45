"""Layer by layer (models/layerwise.py) computes what the loaded model computes: equal to the bit on CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, MOE, VOCAB, tiny_model

from compactlm.errors import CompactLMError
from compactlm.importance import activation_scores, block_importance, lm_loss_importance, magnitude_scores
from compactlm.metrics import perplexity, teacher_agreement
from compactlm.models.layerwise import Layerwise
from compactlm.models.shards import Shards


def _batches() -> list[dict[str, torch.Tensor]]:
    """Two batches with padded rows (the mask matters), one of another length."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (3, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    mask[2, 9:] = 0
    other = torch.randint(2, VOCAB, (2, 11), generator=g)
    return [{"input_ids": ids, "attention_mask": mask},
            {"input_ids": other, "attention_mask": torch.ones_like(other)}]


def _saved(model, tmp_path, name: str = "m", dtype: torch.dtype | None = None):
    path = tmp_path / name
    (model.to(dtype) if dtype else model).save_pretrained(path, max_shard_size="20KB")  # several shards
    return path


def _assert_scores_equal(a, b) -> None:
    for field in ("hidden", "heads", "ffn"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.layers.keys() == b.layers.keys()
    for name in a.layers:
        assert torch.equal(a.layers[name], b.layers[name]), name


def _kv(family: str) -> int:
    return 4 if family == "gpt2" else 2


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in MOE])  # MoE: refused (test_moe.py)
def test_scores_equal_in_memory(family, tied, tmp_path):
    model = tiny_model(family, kv_heads=_kv(family), tied=tied)
    lw = Layerwise(_saved(model, tmp_path))
    batches = _batches()
    for head_score in ("paper", "channel"):
        _assert_scores_equal(activation_scores(model, batches, head_score=head_score),
                             activation_scores(lw, batches, head_score=head_score))
    _assert_scores_equal(activation_scores(model, batches, output_aware=True),
                         activation_scores(lw, batches, output_aware=True))
    assert torch.equal(block_importance(model, batches), block_importance(lw, batches))
    _assert_scores_equal(magnitude_scores(model), magnitude_scores(lw))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in MOE])  # MoE: refused (test_moe.py)
def test_evaluation_equal_in_memory(family, tied, tmp_path):
    student = tiny_model(family, kv_heads=_kv(family), tied=tied)
    teacher = tiny_model(family, kv_heads=_kv(family), tied=tied, seed=3)
    lw_student = Layerwise(_saved(student, tmp_path, "s"), head=True)
    lw_teacher = Layerwise(_saved(teacher, tmp_path, "t"), head=True)
    batches = _batches()
    assert perplexity(lw_student, batches) == perplexity(student, batches)
    assert teacher_agreement(lw_student, lw_teacher, batches) == teacher_agreement(student, teacher, batches)
    assert teacher_agreement(lw_student, teacher, batches) == teacher_agreement(student, teacher, batches)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
def test_bfloat16_file_scored_in_float32(family, tmp_path):
    """Weights stored in bf16, computed in f32: embeddings stay mapped in bf16 and their rows are cast. Regression
    (Gemma): the scaled embedding multiplied by sqrt(hidden) in bf16 before the cast; the loaded model casts first."""
    model = tiny_model(family, tied=True)
    path = _saved(model, tmp_path, dtype=torch.bfloat16)
    loaded = type(model).from_pretrained(path, dtype=torch.float32).eval()
    lw = Layerwise(path, torch.float32, head=True)
    assert lw.model.model.embed_tokens.weight.dtype == torch.bfloat16
    batches = _batches()
    _assert_scores_equal(activation_scores(loaded, batches), activation_scores(lw, batches))
    assert perplexity(lw, batches) == perplexity(loaded, batches)


def test_hidden_states_spilled_to_files(tmp_path):
    model = tiny_model("qwen3")
    batches = _batches()
    lw = Layerwise(_saved(model, tmp_path), spill_bytes=0, head=True)  # every batch's states on disk
    _assert_scores_equal(activation_scores(model, batches), activation_scores(lw, batches))
    assert perplexity(lw, batches) == perplexity(model, batches)


def test_sliding_and_full_layers_get_their_own_masks(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_hidden_layers=4, vocab_size=VOCAB, max_position_embeddings=128, use_sliding_window=True,
                         sliding_window=4, max_window_layers=2, layer_types=["full_attention", "sliding_attention"] * 2)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    lw = Layerwise(_saved(model, tmp_path), head=True)
    batches = _batches()
    _assert_scores_equal(activation_scores(model, batches), activation_scores(lw, batches))
    assert perplexity(lw, batches) == perplexity(model, batches)


def test_one_layer_resident_at_a_time(tmp_path):
    lw = Layerwise(_saved(tiny_model("llama", layers=4), tmp_path))
    resident = []

    def count(module, args, kwargs) -> None:
        resident.append(sum(not next(layer.parameters()).is_meta for layer in lw.layers))

    for layer in lw.layers:
        layer.register_forward_pre_hook(count, with_kwargs=True)
    lw.run(_batches()).close()
    assert resident == [1] * 8  # 4 layers x 2 batches, each with only its own layer loaded
    assert all(p.is_meta for layer in lw.layers for p in layer.parameters())


def test_lm_loss_needs_the_whole_model(tmp_path):
    lw = Layerwise(_saved(tiny_model("llama"), tmp_path))
    with pytest.raises(CompactLMError, match="lm_loss.*whole model in memory"):
        lm_loss_importance(lw, _batches())
    with pytest.raises(CompactLMError, match="n=2 layers needs the whole model"):
        block_importance(lw, _batches(), n=2)


def test_shards_sizes_and_missing_tensor(tmp_path):
    model = tiny_model("gpt2", kv_heads=4)
    path = _saved(model, tmp_path)
    n = sum(p.numel() for p in model.state_dict().values())  # GPT-2 saves its tied head once
    shards = Shards(path)
    for k in shards.files:  # the header alone gives what the data holds
        meta, data = shards.meta(k), shards.mapped(k)
        assert (meta.shape, meta.dtype, meta.device.type) == (data.shape, data.dtype, "meta")
    assert torch.equal(shards.read("transformer.wpe.weight", torch.float32), model.transformer.wpe.weight)
    assert n >= sum(shards.mapped(k).numel() for k in shards.files)
    with pytest.raises(CompactLMError, match="no tensor 'nope'"):
        shards.mapped("nope")


# ---------------------------------------------------------------- the stages under memory_gb


def _cli(capsys, *args: str) -> dict:
    import json

    from compactlm.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _common(checkpoint, text_file, out_dir) -> list[str]:
    return [f"model={checkpoint}", f"data={text_file}", f"out_dir={out_dir}", "calib.sequences=8", "calib.seq_len=32",
            "calib.batch_size=4", "eval.seq_len=32", "eval.sequences=8", "eval.speed=false"]


TINY_BUDGET = "memory_gb=0.00001"  # 10 KB: below the tiny model's weights


def test_prune_within_budget_equals_unbudgeted(capsys, tiny_checkpoint, text_file, tmp_path, caplog):
    from safetensors.torch import load_file

    from compactlm.models.shards import Shards

    target = ["target.hidden_size=16", "target.intermediate_size=24", "target.num_attention_heads=2",
              "target.num_hidden_layers=2", "target.layer_metric=block_importance"]
    _cli(capsys, "prune", *_common(tiny_checkpoint, text_file, tmp_path / "whole"), *target, "prune.reconstruct=none")
    with caplog.at_level("INFO"):
        _cli(capsys, "prune", *_common(tiny_checkpoint, text_file, tmp_path / "budget"), *target, TINY_BUDGET)
    assert "one decoder layer" in caplog.text
    assert "prune.reconstruct needs the whole model in memory" in caplog.text  # the default refit is skipped
    whole, budget = Shards(tmp_path / "whole"), Shards(tmp_path / "budget")
    assert set(whole.files) - {"lm_head.weight"} == set(budget.files)  # the tied head is saved once
    for name in budget.files:
        assert torch.equal(whole.mapped(name), budget.mapped(name)), name
    assert torch.equal(load_file(tmp_path / "whole" / "scores.safetensors")["ffn"],
                       load_file(tmp_path / "budget" / "scores.safetensors")["ffn"])
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tmp_path / "whole")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "budget")
    ids = torch.randint(0, a.config.vocab_size, (1, 12))
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_score_and_eval_within_budget(capsys, tiny_checkpoint, text_file, tmp_path, caplog):
    from compactlm.importance.scores import Scores

    _cli(capsys, "score", *_common(tiny_checkpoint, text_file, tmp_path / "whole"))
    with caplog.at_level("WARNING"):
        _cli(capsys, "score", *_common(tiny_checkpoint, text_file, tmp_path / "budget"), TINY_BUDGET)
    assert "need the whole model in memory" in caplog.text  # lm_loss is skipped, block_importance is not
    whole = Scores.load(tmp_path / "whole" / "scores.safetensors")
    budget = Scores.load(tmp_path / "budget" / "scores.safetensors")
    assert sorted(budget.layers) == ["block_importance"]
    whole = Scores(whole.hidden, whole.heads, whole.ffn, {"block_importance": whole.layers["block_importance"]})
    _assert_scores_equal(whole, budget)

    plain = _cli(capsys, "eval", *_common(tiny_checkpoint, text_file, tmp_path / "e1"), f"teacher={tiny_checkpoint}")
    budgeted = _cli(capsys, "eval", *_common(tiny_checkpoint, text_file, tmp_path / "e2"), f"teacher={tiny_checkpoint}",
                    TINY_BUDGET)
    assert budgeted == plain


def test_budget_that_fits_loads_whole(capsys, tiny_checkpoint, text_file, tmp_path, caplog):
    with caplog.at_level("INFO"):
        _cli(capsys, "eval", *_common(tiny_checkpoint, text_file, tmp_path / "e"), "memory_gb=1")
    assert "fit memory_gb=1" in caplog.text


def test_masks_are_rebuilt_per_call_not_kept_for_every_batch(tmp_path):
    """Regression: the run kept every batch's attention masks (4-D for eager attention: (B, 1, S, S) each, two for
    sliding-window families) for the whole run, outside the memory budget. Now each layer call gets its own,
    gone once the call returns: at most one batch's masks are alive."""
    import weakref

    model = tiny_model("gemma2", kv_heads=2)
    model.config._attn_implementation = "eager"
    lw = Layerwise(_saved(model, tmp_path))
    lw.model.config._attn_implementation = "eager"
    alive = []

    def watch(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            alive.append(weakref.ref(mask))
            assert sum(r() is not None for r in alive) <= 2, "masks of earlier calls are still held"

    handles = [layer.register_forward_pre_hook(watch, with_kwargs=True) for layer in lw.layers]
    try:
        lw.run(_batches() * 3).close()
    finally:
        for h in handles:
            h.remove()
    assert len(alive) == len(lw.layers) * 6
