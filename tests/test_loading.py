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
