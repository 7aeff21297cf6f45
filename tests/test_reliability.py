"""Mistakes a careful user can make end in one line naming the key or file, and nothing is lost or half-written."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path

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


def _default(key: str):
    value = Config()
    for part in key.split("."):
        value = getattr(value, part)
    return value


LIST_KEYS = {key for key in FLOAT_KEYS if isinstance(_default(key), tuple)}  # the non-finite number goes inside


def test_the_schema_has_float_keys():
    assert {"prune.ridge", "distill.lr", "train.lr", "memory_gb", "distill.temperature"} <= set(FLOAT_KEYS)
    assert "prune.per_layer_strength" in LIST_KEYS and LIST_KEYS <= set(FLOAT_KEYS)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e999"])
def test_every_float_key_refuses_non_finite_numbers(key, value):
    """Regression: prune.ridge=nan and train.lr=nan were accepted and wrote a model of NaN with exit 0."""
    value = f"[{value}]" if key in LIST_KEYS else value
    with pytest.raises(CompactLMError, match=rf"^{re.escape(key)}.*finite"):
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


# ---------------------------------------------------------------- who writes where

def _tree(root) -> dict:
    """Every file under `root` with its bytes: what a run must not change."""
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command,key,inside", [
    ("prune", "out_dir", ""), ("prune", "out_dir", "pruned"), ("distill", "out_dir", "student-out"),
    ("export", "out", "model.gguf"), ("score", "out_dir", "scores"),
])
def test_an_output_inside_a_source_is_refused_before_any_work(command, key, inside, tiny_checkpoint, text_file,
                                                                tmp_path, capsys):
    """Regression: out_dir=<the model's own folder> overwrote the source checkpoint with its pruned copy."""
    import shutil

    from compactlm.cli import main

    source = tmp_path / "source"
    shutil.copytree(tiny_checkpoint, source)
    before = _tree(source)
    target = source / inside if inside else source
    models = [f"teacher={source}", f"student={source}"] if command == "distill" else [f"model={source}"]
    code = main([command, *models, f"data={text_file}", f"{key}={target}", "distill.steps=1"])
    err = capsys.readouterr().err
    assert code == 2 and f"would write into {'teacher' if command == 'distill' else 'model'}=" in err, err
    assert len(err.strip().splitlines()) == 1 and _tree(source) == before


def _holder(out_dir, tmp_path):
    """A process that holds out_dir's lock until killed; returns it once it holds it."""
    import subprocess
    import sys
    import time

    ready = tmp_path / "ready"
    code = ("import sys, time, pathlib; from compactlm.ownership import hold\n"
            "with hold(sys.argv[1]):\n    pathlib.Path(sys.argv[2]).touch(); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out_dir), str(ready)])
    while not ready.exists():
        assert proc.poll() is None, "the lock holder died"
        time.sleep(0.05)
    return proc


def test_a_second_run_on_an_out_dir_in_use_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path, capsys):
    """Regression: two runs wrote into one out_dir and one died mid-checkpoint. Now the second gets one line
    naming the holder; once the holder is killed (SIGKILL: no cleanup), its lock is stale and taken over."""
    import signal

    from compactlm.cli import main
    from compactlm.ownership import hold

    out_dir = tmp_path / "run"
    holder = _holder(out_dir, tmp_path)
    try:
        code = main(["score", "model=nowhere", f"out_dir={out_dir}"])
        err = capsys.readouterr().err
        assert code == 2 and f"in use by another run (pid {holder.pid} on " in err, err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".run.lock").exists()  # the killed holder's file stays...
    with hold(out_dir):  # ...but its lock went with the process
        pass
    assert not (tmp_path / ".run.lock").exists()


def test_the_next_run_of_an_out_dir_removes_what_killed_runs_left(tmp_path):
    """Staging folders and temp files of a killed prune, export, score or distillation (beside the out_dir and
    inside it) are removed once the next run holds the out_dir; other files, and other out_dirs', stay."""
    from compactlm.ownership import hold

    out = tmp_path / "run"
    left = [tmp_path / ".run.staging.k2j4_x9a", tmp_path / ".run.search.ab12cd34", out / ".prune.staging.q8z1m3pa",
            out / "distill" / ".final.q8z1m3pa", out / "export" / ".model-q8_0.gguf.x1y2z3w4",
            out / "distill" / ".checkpoint.tmp", out / "teacher_cache" / "k8" / ".shard.ab12cd34"]
    kept = [tmp_path / ".run2.staging.k2j4_x9a", out / "distill" / "final" / "model.safetensors",
            out / "distill" / ".checkpoint.old" / "state.pt", out / "compactlm.yaml"]
    for path in left + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if "staging" in path.name or path.name.startswith(".final") else path.write_text("x")
    with hold(out):
        pass
    assert not [p for p in left if p.exists()] and all(p.exists() for p in kept)


def test_expected_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    """A config file that is not UTF-8 (a UnicodeDecodeError) and an unreadable file (an OSError) are one line
    with exit 2; COMPACTLM_DEBUG=1 shows the traceback instead."""
    from compactlm.cli import main

    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("model: caf\xe9\n".encode("latin-1"))
    assert main(["score", "--config", str(bad), f"out_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not UTF-8" in err, err
    monkeypatch.setenv("COMPACTLM_DEBUG", "1")
    with pytest.raises(UnicodeDecodeError):
        main(["score", "--config", str(bad), f"out_dir={tmp_path / 'o'}"])


def test_code_shipped_with_a_checkpoint_runs_only_when_trusted(tiny_checkpoint, tmp_path, capsys):
    """A checkpoint whose config asks for its own code (auto_map): by default one line saying how to allow it,
    never a question on stdin; trust_remote_code=true reaches transformers."""
    import json
    import shutil

    from compactlm.cli import main
    from compactlm.models.loading import load_model_config, trusting_remote_code

    custom = tmp_path / "custom"
    shutil.copytree(tiny_checkpoint, custom)
    config = json.loads((custom / "config.json").read_text())
    config |= {"model_type": "tiny_custom", "auto_map": {"AutoConfig": "configuration_tiny.TinyConfig"}}
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "configuration_tiny.py").write_text(
        "from transformers import LlamaConfig\nclass TinyConfig(LlamaConfig):\n    model_type = 'llama'\n")
    assert main(["prune", f"model={custom}", f"out_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "trust_remote_code" in err, err
    with trusting_remote_code(True), pytest.raises(CompactLMError, match="unsupported model family 'tiny_custom'"):
        load_model_config(str(custom))  # past the gate: its own config class loaded (a family compactlm lacks)


def test_a_refused_resume_writes_nothing(tiny_checkpoint, text_file, tmp_path, capsys):
    """A distillation killed at its checkpoint, resumed with a changed key (refused), then with the right keys
    (resumed): the refused attempt leaves every file of the out_dir as it was, so the right resume still works."""
    import signal

    from conftest import run_killed_at_checkpoint
    from test_distill import _args, models  # noqa: F401 - the fixture's helpers

    from compactlm.cli import main

    out = tmp_path / "kd"
    args = [f"teacher={tiny_checkpoint}", f"student={tiny_checkpoint}", f"data={text_file}", f"out_dir={out}",
            "distill.steps=4", "distill.batch_size=4", "distill.seq_len=32", "distill.save_every=2",
            "distill.eval_every=2", "distill.eval_sequences=4", "eval.speed=false"]
    assert run_killed_at_checkpoint(["distill", *args], 2, tmp_path / "killed.log") == -signal.SIGKILL
    before = _tree(out)
    assert main(["distill", *args, "resume=true", "distill.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "distill.lr" in err and len(err.strip().splitlines()) == 1, err
    assert _tree(out) == before
    assert main(["distill", *args, "resume=true"]) == 0


@pytest.mark.parametrize("command", ["score", "prune", "eval"])
def test_a_tokenizer_larger_than_the_embedding_is_one_line(command, bpe_tokenizer, text_file, tmp_path, capsys):
    """Regression: only training checked it; score, prune and eval died with an IndexError in the first forward."""
    from compactlm.cli import main

    small = tmp_path / "small-vocab"
    tiny_model("llama").save_pretrained(small)  # 64 embedding rows
    bpe_tokenizer.save_pretrained(small)  # ~300 tokens
    capsys.readouterr()  # the save's progress bars
    code = main([command, f"model={small}", f"data={text_file}", f"out_dir={tmp_path / 'out'}", "eval.speed=false",
                 "calib.seq_len=32", "eval.seq_len=32", "target.intermediate_size=0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "more than the 64 rows" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def _killed_distill(tiny_checkpoint, text_file, tmp_path) -> list[str]:
    """A distillation SIGKILLed right after its checkpoint of step 2; its arguments."""
    import signal

    from conftest import run_killed_at_checkpoint

    args = [f"teacher={tiny_checkpoint}", f"student={tiny_checkpoint}", f"data={text_file}",
            f"out_dir={tmp_path / 'kd'}", "distill.steps=4", "distill.batch_size=4", "distill.seq_len=32",
            "distill.save_every=2", "distill.eval_every=2", "distill.eval_sequences=4", "eval.speed=false"]
    assert run_killed_at_checkpoint(["distill", *args], 2, tmp_path / "killed.log") == -signal.SIGKILL
    return args


class Unsafe:
    """An object weights_only=True refuses to unpickle."""


def test_damaged_files_in_a_run_directory_are_one_line_naming_the_file(tiny_checkpoint, text_file, tmp_path, capsys):
    """Regression: a torn progress.json or eval.json, and a training state with pickled objects (which
    torch.load's weights_only refuses), ended in a decoder's or unpickler's traceback."""
    from compactlm.cli import main

    args = _killed_distill(tiny_checkpoint, text_file, tmp_path)
    progress = tmp_path / "kd" / "checkpoint" / "progress.json"
    good = progress.read_text()
    progress.write_text('{"step": 2, "tok')
    assert main(["distill", *args]) == 2  # the refusal to overwrite a checkpoint reads its step there
    err = capsys.readouterr().err
    assert "progress.json is not valid JSON" in err and len(err.strip().splitlines()) == 1, err
    progress.write_text(good)
    torch.save({"model": Unsafe()}, tmp_path / "kd" / "checkpoint" / "trainer_state.pt")
    assert main(["distill", *args, "resume=true"]) == 2
    err = capsys.readouterr().err
    assert "trainer_state.pt: it holds objects other than tensors" in err and len(err.strip().splitlines()) == 1, err
    run = tmp_path / "run"
    (run / "evaluate").mkdir(parents=True)
    (run / "evaluate" / "eval.json").write_bytes(b'{"teacher": \xff}')
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "eval.json is not valid JSON" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("keep", [10, 600, -64], ids=["inside-the-header", "inside-the-metadata", "inside-the-data"])
def test_a_cut_gguf_file_is_one_line_naming_it(keep, tiny_checkpoint, tmp_path, capsys):
    """Regression: a GGUF file cut inside its header ended in a struct.error traceback from the reader."""
    from compactlm.cli import main

    whole = tmp_path / "whole.gguf"
    assert main(["export", f"model={tiny_checkpoint}", f"out={whole}", "export.type=f32"]) == 0
    data = whole.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    capsys.readouterr()
    assert main(["eval", f"model={cut}"]) == 2
    err = capsys.readouterr().err
    assert f"model file {cut} is not a whole GGUF file" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("config,message", [
    ([1, 2], "is not a JSON object"),
    ({"num_attention_heads": 0}, "impossible num_attention_heads=0"),
    ({"num_key_value_heads": 3}, "4 heads in 3 KV groups"),
    ({"hidden_size": -32}, "impossible hidden_size=-32"),
])
def test_a_config_json_with_impossible_values_is_one_line(config, message, tiny_checkpoint, tmp_path, capsys):
    """Regression: zero heads ended in a ZeroDivisionError, a config.json that is a list in an AttributeError."""
    import json
    import shutil

    from compactlm.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    saved = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(saved | config if isinstance(config, dict) else config))
    assert main(["prune", f"model={model}", f"out_dir={tmp_path / 'out'}", "target.hidden_size=0.5"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_jsonl_file_that_is_not_utf8_names_its_line(tmp_path):
    """Regression: a latin-1 .jsonl ended in a UnicodeDecodeError traceback that named no file."""
    from compactlm import data

    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(CompactLMError, match=r"docs.jsonl:2: not UTF-8 text"):
        list(data.iter_texts(str(path)))


@pytest.mark.parametrize("where,message", [
    ("under-a-file/x.gguf", "is a file, not a folder"),
    ("a-folder.gguf", "is a folder: give a file name"),
    ("read-only/x.gguf", "cannot write in"),
])
def test_export_to_a_place_it_cannot_write_is_one_line_and_leaves_nothing(where, message, tiny_checkpoint, tmp_path,
                                                                            capsys, monkeypatch):
    """Regression: these named a temp file or said 'File exists'; they are checked before the model loads."""
    import os

    from compactlm.cli import main

    (tmp_path / "under-a-file").write_text("x")
    (tmp_path / "a-folder.gguf").mkdir()
    (tmp_path / "read-only").mkdir()
    real_mkstemp = __import__("tempfile").mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # root writes anywhere: a read-only folder as the OS says it
        if dir is not None and str(dir).endswith("read-only"):
            raise PermissionError(13, os.strerror(13))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr("compactlm.inputs.tempfile.mkstemp", mkstemp)
    before = sorted(tmp_path.rglob("*"))
    assert main(["export", f"model={tiny_checkpoint}", f"out={tmp_path / where}"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(tmp_path.rglob("*")) == before


def test_a_full_disk_during_export_is_one_line_and_leaves_no_partial_file(tiny_checkpoint, tmp_path, capsys,
                                                                          monkeypatch):
    """ENOSPC while the GGUF tensors are written: one line from the OS, exit 2, the temp file removed."""
    import errno
    import os

    import gguf

    from compactlm.cli import main

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    assert main(["export", f"model={tiny_checkpoint}", f"out={tmp_path / 'out' / 'm.gguf'}"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_respect_the_umask(mask, bpe_tokenizer, tmp_path, monkeypatch):
    """Regression: GGUF files, checkpoints and token-store folders were 0600/0700 whatever the umask (tempfile's
    modes survive the rename into place): unreadable to a colleague on a shared machine."""
    import os
    import stat

    from compactlm.export import export_gguf
    from compactlm.models.loading import save_checkpoint
    from compactlm.tokenstore import Source, open_store

    monkeypatch.setenv("COMPACTLM_TOKENS", str(tmp_path / "stores"))
    (tmp_path / "docs.txt").write_text("some text to tokenise\n\n" * 50)
    model = tiny_model("llama")
    model.config.vocab_size = len(bpe_tokenizer)
    model.resize_token_embeddings(len(bpe_tokenizer))
    old = os.umask(mask)
    try:
        gguf = export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf", "f32")["gguf"]
        ckpt = save_checkpoint(model, bpe_tokenizer, tmp_path / "ckpt")
        store = open_store(Source(str(tmp_path / "docs.txt")), bpe_tokenizer, progress=False).path
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(gguf) == 0o666 & ~mask and mode(ckpt) == 0o777 & ~mask and mode(store) == 0o777 & ~mask
    # the weights too: transformers writes model.safetensors through a 0600 temp file (found on a real run)
    assert {p.name: mode(p) for p in ckpt.iterdir()} == {p.name: 0o666 & ~mask for p in ckpt.iterdir()}


def test_an_out_dir_that_is_a_symlink_stages_on_its_targets_file_system(tmp_path, monkeypatch):
    """Regression: the staging folder went beside the link, so with the target on another file system the final
    moves failed (EXDEV) after all the work. Now it goes beside the target: the moves are renames."""
    import tempfile

    from compactlm.inputs import staged_output

    target, link = tmp_path / "other-fs" / "run", tmp_path / "here" / "run"
    target.mkdir(parents=True)
    link.parent.mkdir()
    link.symlink_to(target)
    made = []
    real = tempfile.mkdtemp

    def spy(*args, **kwargs):
        made.append(Path(real(*args, **kwargs)))
        return str(made[-1])

    monkeypatch.setattr("compactlm.inputs.tempfile.mkdtemp", spy)
    with staged_output(link) as out:
        (out / "result.txt").write_text("done")
    staging = [p for p in made if ".staging." in p.name]  # (the first is check_out_dir's probe)
    assert staging[0].parent == target.parent and (target / "result.txt").read_text() == "done"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "huge-header", "bad-dtype", "offsets-outside"])
def test_damaged_safetensors_are_one_line_on_the_layer_by_layer_and_streamed_paths(damage, tmp_path):
    """Regression: the streamed and layer-by-layer readers trusted the header: a truncated file mapped past its
    end, a garbage one raised from struct or json. Each is now one line naming the file."""
    import json
    import struct

    from compactlm.models.shards import Shards

    ckpt = tmp_path / "ckpt"
    tiny_model("llama").save_pretrained(ckpt)
    file = ckpt / "model.safetensors"
    raw = file.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8: 8 + size])
    name = next(k for k in header if k != "__metadata__")
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage":
        raw = b"\x00\x01not a safetensors file at all"
    elif damage == "huge-header":
        raw = struct.pack("<Q", 1 << 40) + raw[8:]
    else:
        header[name] = header[name] | ({"dtype": "F7"} if damage == "bad-dtype" else {"data_offsets": [0, 1 << 30]})
        blob = json.dumps(header).encode()
        raw = struct.pack("<Q", len(blob)) + blob + raw[8 + size:]
    file.write_bytes(raw)
    with pytest.raises(CompactLMError, match=r"model\.safetensors"):
        shards = Shards(ckpt)
        for tensor_name in shards.files:
            shards.mapped(tensor_name)


def test_a_full_disk_at_a_training_checkpoint_keeps_the_previous_one(tiny_checkpoint, text_file, tmp_path, capsys,
                                                                       monkeypatch):
    """ENOSPC while the second checkpoint is written: one line from the OS, exit 2; the first checkpoint is
    intact and resumable, and no partial one is left."""
    import errno
    import os

    from compactlm.cli import main
    from compactlm.distill import checkpoint as ckpt

    real, calls = torch.save, []

    def save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save)
    out = tmp_path / "kd"
    args = [f"teacher={tiny_checkpoint}", f"student={tiny_checkpoint}", f"data={text_file}", f"out_dir={out}",
            "distill.steps=4", "distill.batch_size=4", "distill.seq_len=32", "distill.save_every=2",
            "distill.eval_every=0", "distill.eval_sequences=4", "eval.speed=false"]
    assert main(["distill", *args]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # (progress bars above it)
    assert len(errors) == 1 and errors[0].endswith("No space left on device"), errors
    assert ckpt.read_progress(ckpt.latest(out)).step == 2 and not (out / ".checkpoint.tmp").exists()
    monkeypatch.setattr(ckpt.torch, "save", real)
    assert main(["distill", *args, "resume=true"]) == 0


@pytest.mark.parametrize("when", ["build", "extension"])
def test_a_full_disk_while_tokenising_is_one_line_and_keeps_the_store(when, tiny_checkpoint, text_file, tmp_path,
                                                                       capsys, monkeypatch):
    """ENOSPC while the token store is written (a first build, or an extension of a smaller store): one line from
    the OS, exit 2, no temp folder and no partial output left, an older store intact; the next run succeeds and
    reads the same tokens as a store built in one go."""
    import errno
    import os

    import numpy as np

    from compactlm import tokenstore
    from compactlm.cli import main

    monkeypatch.setenv("COMPACTLM_TOKENS", str(tmp_path / "stores"))
    args = [f"model={tiny_checkpoint}", f"data={text_file}", "calib.sequences=4",
            "calib.seq_len=32"]
    monkeypatch.setattr(tokenstore.splits, "TOKENIZE_DOCS", 1)
    if when == "extension":  # a smaller store first (its first document): the failing run must extend it
        from transformers import AutoTokenizer

        tokenstore.open_store(tokenstore.Source(str(text_file)), AutoTokenizer.from_pretrained(tiny_checkpoint),
                              need_train_tokens=1, progress=False)
    stores = {p: (p / "meta.json").read_text() for p in (tmp_path / "stores").glob("*") if p.is_dir()}
    real, calls = tokenstore._append, []

    def full_after_two(files, *rest):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(files, *rest)

    monkeypatch.setattr(tokenstore, "_append", full_after_two)
    out = tmp_path / "scores"
    assert main(["score", *args, f"out_dir={out}"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].endswith("No space left on device"), errors
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")]
    left = sorted(p for p in (tmp_path / "stores").glob("*") if p.is_dir())
    assert left == sorted(stores) and all((p / "meta.json").read_text() == m for p, m in stores.items())
    monkeypatch.setattr(tokenstore, "_append", real)
    assert main(["score", *args, f"out_dir={out}"]) == 0
    (store,) = [p for p in (tmp_path / "stores").glob("*") if p.is_dir()]
    got = tokenstore.TokenStore(store, json.loads((store / "meta.json").read_text()))
    monkeypatch.setenv("COMPACTLM_TOKENS", str(tmp_path / "one-go"))
    assert main(["score", *args, f"out_dir={tmp_path / 'again'}"]) == 0
    (fresh,) = [p for p in (tmp_path / "one-go").glob("*") if p.is_dir()]
    once = tokenstore.TokenStore(fresh, json.loads((fresh / "meta.json").read_text()))
    n = min(got.meta["tokens"]["train"], once.meta["tokens"]["train"])
    assert np.array_equal(got.tokens("train")[:n], once.tokens("train")[:n])
