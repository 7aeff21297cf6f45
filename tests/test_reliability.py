"""Mistakes a careful user can make end in one line naming the key or file, and nothing is lost or half-written."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch
from conftest import tiny_model

from compactlm.config import Config, load_config
from compactlm.errors import CompactLMError


def _keys_of_type(cls: type, wanted: type, prefix: str = "") -> list[str]:
    """Dotted names of every field of `cls` (recursively) whose annotation admits `wanted`."""
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _keys_of_type(tp, wanted, f"{prefix}{f.name}.")
        elif tp is wanted or wanted in typing.get_args(tp):
            out.append(prefix + f.name)
    return out


FLOAT_KEYS = _keys_of_type(Config, float)


def test_the_schema_has_float_keys():
    assert {"prune.ridge", "distill.lr", "train.lr", "memory_gb", "distill.temperature"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e999"])
def test_every_float_key_refuses_non_finite_numbers(key, value):
    """Regression: prune.ridge=nan and train.lr=nan were accepted and wrote a model of NaN with exit 0."""
    with pytest.raises(CompactLMError, match=rf"^{key}.*finite"):
        load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize("override,message", [
    ("seed=99999999999999999999", "seed.*out of range"),
    ("seed=-1", r"seed=-1: must lie in \[0, 2\^32\)"),
    ("seed=4294967296", "seed.*2\\^32"),
    ("calib.sequences=99999999999999999999", "calib.sequences.*out of range"),
    ("device=gpu", "device='gpu': must be auto"),
    ("device=cuda:x", "device="),
])
def test_absurd_integers_and_devices_are_refused(override, message):
    with pytest.raises(CompactLMError, match=message):
        load_config(None, [override])


def test_a_leading_tilde_is_expanded_in_every_path_key(tmp_path, monkeypatch):
    """Regression: `out_dir=~/runs/x` made a folder named `~` in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    keys = ["model", "tokenizer", "teacher", "student", "data", "out_dir", "out", "importance.scores",
            "distill.teacher_cache"]
    cfg = load_config(None, [f"{key}=~/{key}" for key in keys] + ["eval.tasks=[~/a.yaml, hellaswag]"])
    for key in keys:
        section, _, name = key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        assert value == str(tmp_path / key), key
    assert cfg.eval.tasks == (str(tmp_path / "a.yaml"), "hellaswag")
    (tmp_path / "c.yaml").write_text("out_dir: ~/from-yaml\n")
    assert load_config(tmp_path / "c.yaml").out_dir == str(tmp_path / "from-yaml")  # from YAML too


def _poisoned(model):
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "layers.0" in n).view(-1)[0] = float("nan")
    return model


def test_a_model_with_nan_is_never_written(tmp_path, bpe_tokenizer):
    """Regression: NaN weights were saved with exit 0. A checkpoint and a GGUF file refuse them, leaving nothing."""
    from compactlm.export import export_gguf
    from compactlm.models.loading import save_checkpoint

    model = _poisoned(tiny_model("llama"))
    with pytest.raises(CompactLMError, match="layers.0.*NaN or infinity"):
        save_checkpoint(model, None, tmp_path / "ckpt")
    with pytest.raises(CompactLMError, match="NaN or infinity"):
        export_gguf(model, bpe_tokenizer, tmp_path / "out" / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_training_stops_at_the_first_non_finite_loss_before_the_weights_change(tmp_path):
    """Regression: the loop checked the loss after the optimizer step, so a non-finite gradient had already
    reached the weights (and a checkpoint could save them). Now the step is refused and nothing more is saved."""
    from conftest import VOCAB

    from compactlm.distill.distributed import Dist
    from compactlm.distill.loop import Session, fit

    student, teacher = _poisoned(tiny_model("llama", layers=2, seed=2)), tiny_model("llama", layers=3, seed=1)
    before = {n: p.clone() for n, p in student.named_parameters()}
    rows = torch.randint(2, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))
    tc = load_config(None, ["distill.steps=3", "distill.batch_size=4", "distill.seq_len=16", "distill.save_every=1"]).distill
    session = Session(tmp_path, Dist(0, 1, torch.device("cpu")))
    with pytest.raises(CompactLMError, match="step 1: the loss is nan"):
        fit(student, rows, rows[:2], tc, session, teacher)
    for name, p in student.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0, equal_nan=True)
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "final").exists()
