"""`compactlm run` end to end on a tiny model, resuming after a kill, and every shipped config validated."""

from __future__ import annotations

import hashlib
import json
import math
import signal
from pathlib import Path

import pytest
import torch
from conftest import MOE, ffn_key, run_killed_at_checkpoint, tiny_config
from gguf import GGUFReader
from transformers import AutoModelForCausalLM

from compactlm import pipeline
from compactlm.cli import main
from compactlm.config import load_config
from compactlm.models.family import family_of
from compactlm.models.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def tiny_run_args(checkpoint, text_file, run_dir) -> list[str]:
    return [
        f"model={checkpoint}", f"data={text_file}", f"out_dir={run_dir}", "calib.sequences=8", "calib.seq_len=32",
        "calib.batch_size=4", "calib.layer_sequences=4", "importance.layer_metrics=[block_importance]",
        "eval.seq_len=32", "eval.sequences=8", "eval.gen_tokens=4", "distill.steps=6", "distill.batch_size=4",
        "distill.seq_len=32", "distill.eval_every=3", "distill.save_every=2", "distill.eval_sequences=4",
        "distill.lr=0.001", "distill.warmup_steps=1",
    ]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_loads_and_validates(path, capsys):
    cfg = load_config(path)
    pipeline.check(cfg)
    assert pipeline.plan_stages(cfg)
    assert main(["run", "--config", str(path), "--dry-run"]) == 0
    assert "prune" in capsys.readouterr().out


def test_configs_exist_for_the_documented_recipes():
    names = {p.name for p in CONFIGS}
    assert {"smollm2-135m.yaml", "config_llama1b.yaml", "llama3.1-8b-to-4b-width.yaml", "llama3.1-8b-to-4b-depth.yaml",
            "mistral-nemo-12b-to-8b.yaml", "tinyshakespeare-gpt.yaml"} <= names


def test_dry_run_rejects_an_invalid_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: smollm2-135m\ndistill:\n  tokenz: 5\n")
    assert main(["run", "--config", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "distill.tokenz" in err and len(err.strip().splitlines()) == 1
    no_target = tmp_path / "no_target.yaml"
    no_target.write_text("model: smollm2-135m\nout_dir: runs/x\n")
    assert main(["run", "--config", str(no_target), "--dry-run"]) == 2
    assert "target" in capsys.readouterr().err


def test_run_end_to_end_with_report(tiny_checkpoint, text_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = tiny_run_args(tiny_checkpoint, text_file, run_dir) + [
        "target.hidden_size=24", "target.num_attention_heads=2", "target.intermediate_size=0.5", "export.type=q8_0"]
    assert main(["run", *args]) == 0, capsys.readouterr().err
    for stage in ("score", "prune", "distill", "evaluate", "export", "report"):
        assert (run_dir / stage / pipeline.DONE).is_file(), stage
    report = (run_dir / "report.md").read_text()
    assert "distilled" in report and "![Width importance](importance_width.png)" in report
    # the GGUF export: hidden 24 is no multiple of 32, so q8_0 keeps every matrix f16 and the report counts them
    exported = json.loads((run_dir / "export" / pipeline.DONE).read_text())
    assert exported["gguf"] == str(run_dir / "export" / "model-q8_0.gguf") and exported["type"] == "q8_0"
    assert "## GGUF export" in report and "`export/model-q8_0.gguf`" in report  # relative to the run
    assert f"| q8_0 | {exported['bytes'] / 2**20:,.1f} MiB | {len(exported['kept_f16'])} |" in report
    gguf_student = load_model(exported["gguf"])  # head_dim 8 although hidden / heads = 12: read from the file
    assert (gguf_student.config.hidden_size, gguf_student.config.head_dim) == (24, 8)
    assert {t.tensor_type.name for t in GGUFReader(exported["gguf"]).tensors} == {"F16", "F32"}
    for png in ("importance_width.png", "importance_layers.png", "training.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    student = AutoModelForCausalLM.from_pretrained(run_dir / "distill" / "final")
    assert student.config.hidden_size == 24
    ids = torch.randint(0, student.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # every matrix f16: within test_export.F16_TOL of the distilled model
        want, got = student(ids).logits, gguf_student(ids).logits
    assert (got - want).abs().max() <= 2e-3 * want.abs().max()
    results = json.loads((run_dir / "evaluate" / "eval.json").read_text())
    assert results["pruned"]["params"] == results["distilled"]["params"] < results["teacher"]["params"]
    # where the inputs came from: the corpus's sha256 in compactlm.yaml, the report and every model card
    data_line = f"data {text_file}: 1 file(s), sha256 {hashlib.sha256(text_file.read_bytes()).hexdigest()}"
    assert f"# {data_line}\n" in (run_dir / "compactlm.yaml").read_text() and f"- {data_line}" in report
    for folder in ("prune", "distill/final", "distill/best"):
        assert f"- {data_line}" in (run_dir / folder / "README.md").read_text(), folder
    assert load_config(str(run_dir / "compactlm.yaml")) == load_config(None, args)  # the header is only comments

    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob(pipeline.DONE)}
    assert main(["run", *args]) == 0  # everything done: nothing recomputed
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob(pipeline.DONE)} == before

    (run_dir / "report.md").unlink()
    assert main(["report", str(run_dir)]) == 0  # `compactlm report RUN_DIR` rewrites it from the run's files
    assert (run_dir / "report.md").read_text() == report
    assert main(["report", str(tmp_path)]) == 2 and "holds no evaluate/eval.json" in capsys.readouterr().err


def test_run_with_search(tiny_checkpoint, text_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = tiny_run_args(tiny_checkpoint, text_file, run_dir) + [
        "search.target_params=0.6", "search.tolerance=0.1", "search.max_candidates=3", "search.top_k=2",
        "search.distill_steps=2", "target.layer_metric=block_importance", "distill.steps=2"]
    assert main(["run", *args]) == 0, capsys.readouterr().err
    chosen = json.loads((run_dir / "search" / pipeline.DONE).read_text())
    assert (run_dir / "search" / "search.md").read_text().count("**yes**") == 1
    student = AutoModelForCausalLM.from_pretrained(run_dir / "distill" / "final")
    assert student.config.hidden_size == chosen["target"]["hidden_size"]
    assert (run_dir / "search.png").is_file()


def test_cascade_prunes_each_size_from_the_one_before(tiny_checkpoint, text_file, tmp_path, capsys):
    """Sizes as lists: size-1 is pruned from the teacher, size-2 from size-1's distilled model, both distilled
    from the teacher; a fraction is of the teacher at every size; one report lists both; a rerun does nothing."""
    run_dir = tmp_path / "run"
    args = tiny_run_args(tiny_checkpoint, text_file, run_dir) + [
        "target.hidden_size=[24,16]", "target.num_attention_heads=2", "target.intermediate_size=[0.5,0.25]",
        "distill.steps=2", "distill.eval_every=1", "eval.speed=false"]
    assert main(["run", "--dry-run", *args]) == 0
    listed = capsys.readouterr().out
    assert "size-1/score" in listed and "size-2/distill" in listed and "report: report.md: every size" in listed
    assert main(["run", *args]) == 0, capsys.readouterr().err
    teacher = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).config
    for i, hidden, ffn in ((1, 24, round(0.5 * teacher.intermediate_size)),
                           (2, 16, round(0.25 * teacher.intermediate_size))):
        size = run_dir / f"size-{i}"
        config = AutoModelForCausalLM.from_pretrained(size / "distill" / "final").config
        assert (config.hidden_size, config.intermediate_size, config.num_attention_heads) == (hidden, ffn, 2)
        source = str(tiny_checkpoint) if i == 1 else str(run_dir / "size-1" / "distill" / "final")
        assert load_config(size / "prune" / "compactlm.yaml").model == source
        assert load_config(size / "distill" / "compactlm.yaml").teacher == str(tiny_checkpoint)
        assert (size / "report.md").is_file()
    report = (run_dir / "report.md").read_text()
    assert "[size-1](size-1/report.md)" in report and "[size-2](size-2/report.md)" in report
    assert (run_dir / "training.png").read_bytes()[:4] == b"\x89PNG"
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob(pipeline.DONE)}
    assert main(["run", *args]) == 0
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob(pipeline.DONE)} == before
    (run_dir / "report.md").unlink()
    assert main(["report", str(run_dir)]) == 0 and (run_dir / "report.md").read_text() == report


@pytest.mark.parametrize("keys, message", [
    (["target.hidden_size=[24,16]", "target.intermediate_size=[0.5,0.4,0.3]"], "differ in length"),
    (["target.hidden_size=[16,24]"], "must not grow"),
    (["target.hidden_size=[24,0.5]"], "all absolute or all fractions"),
    (["target.hidden_size=[24,16]", "target.drop_layers=[0]"], "drop_layers"),
])
def test_bad_cascades_are_one_line_errors(tiny_checkpoint, text_file, tmp_path, capsys, keys, message):
    assert main(["run", "--dry-run", *tiny_run_args(tiny_checkpoint, text_file, tmp_path / "run"), *keys]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_one_size_commands_refuse_a_cascade(tiny_checkpoint, tmp_path, capsys):
    assert main(["prune", f"model={tiny_checkpoint}", "target.hidden_size=[24,16]", f"out_dir={tmp_path / 'p'}"]) == 2
    assert "only `compactlm run` makes a cascade" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_interrupted_run_resumes_where_it_stopped(tiny_checkpoint, text_file, tmp_path):
    """Kill `compactlm run` during distillation; the rerun skips score/prune and continues the checkpoint."""
    run_dir = tmp_path / "run"
    args = tiny_run_args(tiny_checkpoint, text_file, run_dir) + [
        "target.intermediate_size=0.5", "distill.steps=40", "distill.eval_every=0", "eval.speed=false",
        "distill.save_every=10"]
    assert run_killed_at_checkpoint(["run", *args], 20, tmp_path / "killed.log") == -signal.SIGKILL
    assert (run_dir / "prune" / pipeline.DONE).is_file() and not (run_dir / "distill" / pipeline.DONE).exists()
    prune_done = (run_dir / "prune" / pipeline.DONE).stat().st_mtime_ns
    assert main(["run", *args]) == 0
    assert (run_dir / "prune" / pipeline.DONE).stat().st_mtime_ns == prune_done
    rows = [json.loads(line) for line in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, 41))  # rows after the step-20 checkpoint were dropped, then written again


def _interrupt_after(real, calls: int = 1):
    """A stand-in for `real` that runs it, then raises KeyboardInterrupt (Ctrl-C) on its `calls`-th call."""
    count = {"n": 0}

    def wrapper(*args, **kwargs):
        count["n"] += 1
        out = real(*args, **kwargs)
        if count["n"] == calls:
            raise KeyboardInterrupt
        return out

    return wrapper


def _ctrl_c_points():
    """(stage, object, attribute, calls): Ctrl-C right after that call, most of them with output half written."""
    from compactlm import arch_search, metrics, reporting, stages
    from compactlm.distill import loop
    from compactlm.importance.scores import Scores

    return [
        ("score", Scores, "save", 1),  # scores written into the staging folder, nothing else yet
        ("search", arch_search, "write_table", 1),
        ("prune", stages, "write_checkpoint", 1),  # the refitted model written into staging, plan.json not yet
        ("distill", loop, "train_step", 3),  # after the step-2 checkpoint
        ("evaluate", metrics, "sample_text", 2),  # teacher measured, the pruned model half
        ("report", reporting, "write_report", 1),
    ]


@pytest.mark.parametrize("stage,where", [(p[0], p) for p in _ctrl_c_points()], ids=[p[0] for p in _ctrl_c_points()])
def test_ctrl_c_in_each_stage_leaves_no_partial_output_and_the_rerun_finishes(
        stage, where, tiny_checkpoint, text_file, tmp_path, capsys, monkeypatch):
    _, owner, attribute, calls = where
    run_dir = tmp_path / "run"
    args = tiny_run_args(tiny_checkpoint, text_file, run_dir) + [
        "target.intermediate_size=0.5", "distill.save_every=2", "eval.speed=false", "search.top_k=0",
        "search.tolerance=0.3", "target.layer_metric=block_importance"]
    if stage == "search":
        args += ["search.target_params=0.75"]
    monkeypatch.setattr(owner, attribute, _interrupt_after(getattr(owner, attribute), calls))
    assert main(["run", *args]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not (run_dir / stage / pipeline.DONE).exists()
    assert not [p for p in run_dir.rglob(".*staging*")], "a staging folder was left behind"
    if stage in ("score", "search", "prune", "evaluate"):  # written only through staging: nothing landed
        assert not (run_dir / stage).exists() or not any((run_dir / stage).iterdir())
    if stage == "distill":
        assert (run_dir / "distill" / "checkpoint").is_dir() and not (run_dir / "distill" / "final").exists()
    monkeypatch.undo()
    assert main(["run", *args]) == 0, capsys.readouterr().err
    assert (run_dir / "report" / pipeline.DONE).is_file() and (run_dir / "report.md").is_file()
    if stage == "distill":
        rows = [json.loads(line) for line in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, 7))  # resumed from step 2: no step twice


@pytest.mark.parametrize("family", ["smollm3", "gemma2", "gemma3", "phi3", "olmo2", "qwen3_moe", "mixtral"])
def test_run_end_to_end_for_each_newer_family(family, bpe_tokenizer, text_file, tmp_path, capsys):
    """score -> prune (with the refit) -> distill -> evaluate on a tiny random model of each family added after
    the first five, pruning every axis (and the experts of a mixture of experts, which trains with its
    load-balancing loss); the result loads with plain from_pretrained."""
    checkpoint = tmp_path / family
    config = tiny_config(family, 4, 2, tied=True, layers=4)
    config.vocab_size, config.eos_token_id, config.pad_token_id, config.bos_token_id = len(bpe_tokenizer), 0, 0, 0
    config.output_router_logits = family in MOE
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(checkpoint)
    bpe_tokenizer.save_pretrained(checkpoint)
    run_dir = tmp_path / "run"
    fam = family_of(config)
    experts = [f"target.{fam.keys['experts']}=3"] if fam.moe else []
    args = tiny_run_args(checkpoint, text_file, run_dir) + experts + [
        "target.hidden_size=24", "target.num_attention_heads=2", f"target.{ffn_key(fam)}=0.5",
        "target.num_hidden_layers=3", "distill.steps=3", "eval.speed=false"]
    assert main(["run", *args]) == 0, capsys.readouterr().err
    student = AutoModelForCausalLM.from_pretrained(run_dir / "distill" / "final")
    assert (student.config.hidden_size, student.config.num_attention_heads, student.config.num_hidden_layers) == (24, 2, 3)
    assert fam.dims(student.config).experts == (3 if fam.moe else 0)
    rows = [json.loads(line) for line in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert all(("loss_router" in r) == fam.moe for r in rows)
    results = json.loads((run_dir / "evaluate" / "eval.json").read_text())
    assert math.isfinite(results["distilled"]["perplexity"]) and results["distilled"]["kl"] >= 0
    assert results["distilled"]["params"] < results["teacher"]["params"]


def test_run_with_per_layer_widths(tiny_checkpoint, text_file, tmp_path, capsys):
    """prune.per_layer=relative: the pruned model has a width of its own in each layer, at most the uniform
    target's parameters; distillation and evaluation load it through compactlm's loader, the distilled model
    keeps those shapes, the GGUF export writes it as llama.cpp's deci; it is not cut again."""
    from compactlm.models.layer_shapes import LAYERS_KEY

    run_dir = tmp_path / "run"
    args = tiny_run_args(tiny_checkpoint, text_file, run_dir) + [
        "target.hidden_size=24", "target.intermediate_size=0.5", "prune.per_layer=relative", "distill.steps=2",
        "eval.speed=false", "prune.per_layer_strength=[0.5,1]"]
    assert main(["run", *args]) == 0, capsys.readouterr().err
    records = json.loads((run_dir / "prune" / "config.json").read_text())[LAYERS_KEY]
    chosen = json.loads((run_dir / "prune" / "plan.json").read_text())["per_layer"]  # the searched budgets
    assert chosen["rule"] == "relative" and set(chosen["search"]) == {"0.5", "1.0"}
    assert chosen["search"][str(chosen["strength"])] == min(chosen["search"].values())
    assert len({r["ffn"] for r in records}) > 1
    distilled = load_model(str(run_dir / "distill" / "final"))
    assert [p.shape[0] for n, p in distilled.named_parameters() if n.endswith("mlp.up_proj.weight")] == [
        r["ffn"] for r in records]
    results = json.loads((run_dir / "evaluate" / "eval.json").read_text())
    uniform = load_model(str(tiny_checkpoint)).config.intermediate_size // 2
    assert results["pruned"]["params"] == results["distilled"]["params"] < results["teacher"]["params"]
    assert sum(r["ffn"] for r in records) <= uniform * len(records) + 24 * 4  # spent no more than uniform's
    widths = [r["ffn"] for r in records]
    assert results["distilled"]["dims"]["ffn"] == f"{min(widths)}-{max(widths)}"  # not the container's width
    assert f"| ffn | {load_model(str(tiny_checkpoint)).config.intermediate_size} | {min(widths)}-{max(widths)} |" in (
        run_dir / "report.md").read_text()
    assert main(["export", f"model={run_dir / 'distill' / 'final'}", f"out={tmp_path / 'student.gguf'}"]) == 0
    reader = GGUFReader(tmp_path / "student.gguf")  # llama.cpp's deci: per-layer widths (test_llamacpp runs it)
    assert reader.fields["general.architecture"].contents() == "deci"
    assert reader.fields["deci.feed_forward_length"].contents() == widths
    final = run_dir / "distill" / "final"
    for command in ("score", "prune"):  # a per-layer model is not cut again: one line, no output
        out = tmp_path / command
        assert main([command, f"model={final}", f"out_dir={out}", f"data={text_file}", "target.hidden_size=16"]) != 0
        assert "differ in width" in capsys.readouterr().err and not out.exists()
    cascade = [a for a in args if not a.startswith("target.intermediate_size")] + [
        "target.intermediate_size=[0.5,0.25]", f"out_dir={tmp_path / 'cascade'}"]
    assert main(["run", *cascade]) != 0
    assert "prune.per_layer cannot be used in a cascade" in capsys.readouterr().err
