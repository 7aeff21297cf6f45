"""Evaluation invariants: loss equals HF's own, batch split and padding change nothing, KL(p, p) = 0."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, model_params, tiny_config, tiny_model

from compactlm.errors import CompactLMError
from compactlm.metrics import evaluate, generation_speed, generation_speeds, perplexity, sample_text, teacher_agreement
from compactlm.models.params import num_params


def _rows(batch):
    """Each row alone with its right padding trimmed: a different batch split of the same tokens."""
    out = []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        n = int(mask.sum())
        out.append({"input_ids": ids[None, :n], "attention_mask": mask[None, :n]})
    return out


@pytest.mark.parametrize("family,heads,kv_heads,tied", model_params()[::3])
def test_loss_equals_hf_loss_without_padding(family, heads, kv_heads, tied, token_batch):
    model = tiny_model(family, heads, kv_heads, tied)
    ids = token_batch["input_ids"]
    with torch.no_grad():
        hf_loss = model(input_ids=ids, labels=ids).loss.item()
    out = perplexity(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    # the same logits up to matmul shape; HF averages the CE in float32, we sum it in float64: a few float32
    # roundings (eps 1.2e-7) apart, measured <= 1.5e-7; exp then multiplies that by the loss (~4.2): 6e-7
    assert out["loss"] == pytest.approx(hf_loss, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(hf_loss), rel=1e-5)
    assert out["tokens"] == ids.shape[0] * (ids.shape[1] - 1)


def test_loss_with_padding_equals_hf_loss_with_masked_labels(token_batch):
    model = tiny_model("llama")
    ids, mask = token_batch["input_ids"], token_batch["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        hf_loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    out = perplexity(model, [token_batch])
    assert out["loss"] == pytest.approx(hf_loss, rel=1e-5)  # as above: float32 mean vs float64 sum (measured 5e-8)
    assert out["tokens"] == int(mask.sum()) - ids.shape[0]


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])
def test_results_do_not_depend_on_batch_split(family, token_batch):
    model, teacher = tiny_model(family), tiny_model(family, seed=1)
    whole = evaluate(model, [token_batch], teacher=teacher, speed=False)
    split = evaluate(model, _rows(token_batch), teacher=teacher, speed=False)
    assert whole["tokens"] == split["tokens"]
    for key in ("loss", "perplexity", "kl", "top1_agreement"):
        # (3, 16) and (1, n) batches round differently in float32 (~1e-7 per op, 3 layers; sums are float64):
        # measured <= 9e-7 relative; abs for top1_agreement, which is 0 here (no relative slack at 0)
        assert split[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key


def test_padded_positions_are_ignored(token_batch):
    model, teacher = tiny_model("mistral"), tiny_model("mistral", seed=1)
    noisy = {k: v.clone() for k, v in token_batch.items()}
    pad = noisy["attention_mask"] == 0
    noisy["input_ids"][pad] = torch.randint(2, VOCAB, (int(pad.sum()),))
    a = evaluate(model, [token_batch], teacher=teacher, speed=False)
    b = evaluate(model, [noisy], teacher=teacher, speed=False)
    for key in ("loss", "tokens", "kl", "top1_agreement"):
        # same shapes and operations, padded keys get exactly zero attention: measured equal, 1e-6 a margin
        assert a[key] == pytest.approx(b[key], rel=1e-6), key


def test_kl_of_a_model_with_itself_is_zero(token_batch):
    model = tiny_model("qwen2")
    out = teacher_agreement(model, model, [token_batch])
    assert abs(out["kl"]) < 1e-6  # one model twice: identical logits, so the KL is exactly 0; 1e-6 a margin
    assert out["top1_agreement"] == 1.0


@pytest.mark.parametrize("chunk_tokens", [1, 5, 2048])
def test_kl_matches_direct_computation(chunk_tokens, token_batch):
    student, teacher = tiny_model("llama", tied=True), tiny_model("llama", seed=1)
    ids, mask = token_batch["input_ids"], token_batch["attention_mask"]
    with torch.no_grad():
        log_q = F.log_softmax(student(input_ids=ids, attention_mask=mask).logits.float(), -1)  # (B, S, V)
        log_p = F.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits.float(), -1)
    keep = mask.bool()
    kl = F.kl_div(log_q[keep], log_p[keep], reduction="batchmean", log_target=True).item()
    top1 = (log_q.argmax(-1) == log_p.argmax(-1))[keep].float().mean().item()
    out = teacher_agreement(student, teacher, [token_batch], chunk_tokens=chunk_tokens)
    assert out["kl"] > 0
    # the direct KL is one float32 sum of 37 x 64 signed terms (a KL of ~0.01 per position), ours adds the rows in
    # float64: measured 2.5e-6 relative
    assert out["kl"] == pytest.approx(kl, rel=1e-5)
    assert out["top1_agreement"] == pytest.approx(top1)  # the same matches; the direct share is a float32 mean


def test_bfloat16_models_work(token_batch):
    model = tiny_model("llama")
    ref = teacher_agreement(model, tiny_model("llama", seed=1), [token_batch])
    half, teacher = tiny_model("llama").to(torch.bfloat16), tiny_model("llama", seed=1).to(torch.bfloat16)
    out = evaluate(half, [token_batch], teacher=teacher, speed=False)
    # bf16 (8 significant bits: ~4e-3 per rounding) through 3 layers against float32. Measured 6.5e-7 on the loss
    # (these random models sit near log 64 whatever the rounding) and 6e-4 on the KL, a small difference of two
    # close distributions whose relative error the rounding of the logits inflates
    assert out["loss"] == pytest.approx(perplexity(model, [token_batch])["loss"], rel=2e-2)
    assert out["kl"] == pytest.approx(ref["kl"], rel=0.2)


def test_vocab_mismatch_raises(token_batch):
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.vocab_size = VOCAB + 8
    bigger = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(CompactLMError, match=rf"{VOCAB + 8}.*{VOCAB}"):
        teacher_agreement(tiny_model("llama"), bigger, [token_batch])


def test_no_tokens_raises():
    ids = torch.full((2, 4), 3)
    with pytest.raises(CompactLMError, match="no non-padding"):
        perplexity(tiny_model("gpt2"), [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}])


def test_training_mode_is_restored(token_batch):
    model = tiny_model("gpt2").train()
    perplexity(model, [token_batch])
    assert model.training


def test_generation_speed_and_sample_text(word_tokenizer):
    model = tiny_model("llama", layers=1)
    out = generation_speed(model, word_tokenizer, prompt="the king", new_tokens=4, repeats=1)
    assert out["tokens_per_s"] > 0
    text = sample_text(model, word_tokenizer, "the king", new_tokens=5)
    assert isinstance(text, str)
    assert len(text.split()) <= 5


def test_generation_speed_per_cache_and_batch(word_tokenizer, monkeypatch):
    """Every (mode, batch) is timed on the tokens it produced; a static cache decodes the same greedy text."""
    import compactlm.metrics as metrics

    model = tiny_model("llama", layers=1)
    out = generation_speeds(model, word_tokenizer, ("dynamic", "static"), (1, 3))
    assert set(out["speeds"]) == {"dynamic b1", "dynamic b3", "static b1", "static b3"}
    assert out["tokens_per_s"] == out["speeds"]["dynamic b1"] and all(v > 0 for v in out["speeds"].values())
    dynamic, _ = metrics._generate(model, word_tokenizer, "the king", 6, True, 3, "dynamic")
    static, _ = metrics._generate(model, word_tokenizer, "the king", 6, True, 3, "static")
    assert dynamic.shape == (3, dynamic.shape[1]) and torch.equal(dynamic, static)
    with pytest.raises(CompactLMError, match="mode 'paged' is not one of"):
        generation_speed(model, word_tokenizer, mode="paged")

    def broken(*args, **kwargs):  # what a missing compiler looks like from generate
        raise RuntimeError("inductor: no working C++ compiler")

    monkeypatch.setattr(metrics, "generation_speed", broken)
    assert generation_speeds(model, word_tokenizer, ("compiled",), (1,)) == {"speeds": {"compiled b1": None}}


def test_evaluate_merges_keys(word_tokenizer, token_batch):
    model, teacher = tiny_model("gpt2", layers=1), tiny_model("gpt2", layers=1, seed=1)
    batches = iter([token_batch])  # a one-shot iterator: evaluate walks the batches once
    out = evaluate(model, batches, teacher=teacher, tokenizer=word_tokenizer)
    assert set(out) == {"params", "loss", "perplexity", "tokens", "kl", "top1_agreement", "tokens_per_s", "speeds"}
    assert out["params"] == num_params(model)
    assert out["loss"] == pytest.approx(perplexity(model, [token_batch])["loss"], rel=1e-6)  # same path: equal
    assert set(evaluate(model, [token_batch], tokenizer=word_tokenizer, speed=False)) == {
        "params", "loss", "perplexity", "tokens"}


def test_a_shared_teacher_cache_gives_the_same_metrics(token_batch):
    """compare evaluates two students against one teacher pass: cached hidden states change nothing."""
    teacher, a, b = (tiny_model("llama", 4, 2, seed=s) for s in (0, 1, 2))
    cache = {}
    for student in (a, b):
        fresh = evaluate(student, [token_batch], teacher=teacher, speed=False)
        cached = evaluate(student, [token_batch], teacher=teacher, speed=False, teacher_cache=cache)
        # the cached teacher states are the very tensors a fresh pass computes: measured equal, 1e-6 a margin
        assert cached == pytest.approx(fresh, rel=1e-6) and set(cache) == {0}
