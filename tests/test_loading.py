"""Checkpoint writing and loading: atomic replacement of exported models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from compactlm.models.loading import load_model, save_checkpoint


def test_a_kill_while_replacing_a_checkpoint_keeps_the_old_one(tmp_path, monkeypatch):
    """Bug: exporting best/ deleted the old folder before renaming the new one in; a kill between lost best/."""
    out = tmp_path / "best"
    old, new = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    save_checkpoint(old, None, out)
    real_rename = Path.rename

    def killed_on_rename_in(self, target):
        if Path(target) == out:  # the new version's rename: the process dies here
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_on_rename_in)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(new, None, out)
    monkeypatch.undo()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert leftovers == [".best.old"], leftovers  # the old version, aside; no temp folder
    loaded = load_model(str(out))  # the next reader finishes the swap backwards
    assert out.is_dir() and not (tmp_path / ".best.old").exists()
    torch.testing.assert_close(loaded.state_dict(), old.state_dict())
    save_checkpoint(new, None, out)  # and the next save works as usual
    torch.testing.assert_close(load_model(str(out)).state_dict(), new.state_dict())
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


def test_a_model_bigger_than_one_gpu_spreads_over_several(monkeypatch):
    """device_map=auto only on CUDA with 2+ GPUs and weights above 90% of one GPU's free memory."""
    from conftest import tiny_config

    from compactlm.models.loading import spread_over_gpus
    from compactlm.models.params import params_of_config

    config = tiny_config("llama")
    need = params_of_config(config) * 4
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (need, 10 * need))
    assert spread_over_gpus(config, "float32", torch.device("cuda", 0)) == "auto"
    assert spread_over_gpus(config, "bfloat16", torch.device("cuda", 0)) is None  # half the bytes: fits
    assert spread_over_gpus(config, "float32", torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert spread_over_gpus(config, "float32", torch.device("cuda", 0)) is None


def test_a_built_in_model_is_converted_once_at_its_first_use(tmp_path, monkeypatch, bpe_tokenizer):
    """A built-in GGUF model converts into the cache at its first resolve (every later config, tokenizer and
    weights read is a plain folder's); a cache that cannot be written falls back to the GGUF file, and the
    process does not try the conversion again on every read."""
    from compactlm.export import export_gguf
    from compactlm.models import loading

    model = tiny_model("llama", tied=True)
    model.config.vocab_size = len(bpe_tokenizer)
    model.resize_token_embeddings(len(bpe_tokenizer))
    gguf_file = tmp_path / "tiny.gguf"
    export_gguf(model, bpe_tokenizer, gguf_file, "f32")
    monkeypatch.setenv("COMPACTLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(loading.BUILTINS, "tiny-builtin", ("unused", "tiny.gguf", "unused"))
    monkeypatch.setattr(loading, "_builtin_gguf", lambda name: gguf_file)
    monkeypatch.setattr(loading, "_UNCACHED", set())
    conversions = []
    real = loading._cache_builtin
    monkeypatch.setattr(loading, "_cache_builtin", lambda name: conversions.append(name) or real(name))

    path, gguf = loading.resolve("tiny-builtin")
    assert (path, gguf) == (str(tmp_path / "cache" / "tiny-builtin"), None) and conversions == ["tiny-builtin"]
    loading.load_model_config("tiny-builtin")
    loading.load_tokenizer("tiny-builtin")
    cached = loading.load_model("tiny-builtin")
    assert conversions == ["tiny-builtin"]  # converted once, read from the cache since
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():  # f32 GGUF, float32 checkpoint: the same weights bit for bit, the same operations
        torch.testing.assert_close(cached(ids).logits, load_model(str(gguf_file))(ids).logits, rtol=0, atol=0)

    def read_only(*args, **kwargs):
        raise OSError("read-only file system")

    monkeypatch.setenv("COMPACTLM_CACHE", str(tmp_path / "other-cache"))
    monkeypatch.setattr(loading, "save_checkpoint", read_only)
    assert loading.resolve("tiny-builtin") == (str(tmp_path), "tiny.gguf")
    assert loading.resolve("tiny-builtin") == (str(tmp_path), "tiny.gguf")
    assert conversions == ["tiny-builtin"] * 2  # the failed conversion is not repeated by the next read
