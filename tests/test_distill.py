"""The distillation/training loop: schedule, data order, losses wiring, outputs, errors, kill-and-resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, assert_column_close, run_killed_at_checkpoint, tiny_config, tiny_model
from safetensors.torch import load_file
from transformers import AutoConfig

from compactlm.config import TrainConfig, load_config
from compactlm.distill import checkpoint as ckpt
from compactlm.distill.distributed import Dist
from compactlm.distill.loop import Session, batch_rows, build, fit, lr_at, make_optimizer, train_step, validate
from compactlm.errors import CompactLMError
from compactlm.stages import distill as run_distill
from compactlm.stages import train as run_train

CPU = Dist(0, 1, torch.device("cpu"))
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a busy 2-core machine two threads make tiny matmuls ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _save(config, tok, path: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    config.vocab_size, config.eos_token_id, config.pad_token_id, config.bos_token_id = len(tok), 0, 0, 0
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def models(tmp_path_factory, bpe_tokenizer) -> dict[str, Path]:
    """A tiny Llama teacher (hidden 32, 3 layers, untied) and a narrower student (hidden 16, 2 layers)."""
    root = tmp_path_factory.mktemp("kd-models")
    tok = bpe_tokenizer
    student = tiny_config("llama", 4, 2, tied=True, layers=2)
    student.hidden_size, student.head_dim, student.intermediate_size = 16, 4, 24
    return {"teacher": _save(tiny_config("llama", 4, 2, layers=3), tok, root / "teacher", seed=1),
            "student": _save(student, tok, root / "student", seed=2)}


def _args(models, data, out, **keys) -> list[str]:
    base = {"teacher": models["teacher"], "student": models["student"], "data": data, "out_dir": out,
            "distill.steps": 6, "distill.batch_size": 4, "distill.seq_len": 32, "distill.lr": 0.003,
            "distill.warmup_steps": 2, "distill.eval_every": 3, "distill.eval_sequences": 6,
            "distill.save_every": 2, "eval.speed": False}
    return [f"{k}={v}" for k, v in (base | keys).items()]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


# ---------------------------------------------------------------- pure pieces

def test_lr_schedule_warmup_then_cosine_to_min_lr():
    tc = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4)
    lrs = [lr_at(s, 20, tc) for s in range(20)]
    # python floats: the schedule's own formula up to float64 rounding (~1e-16); approx's default rel 1e-6
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert lrs[12] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 8 / 15)))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # decreasing after warm-up
    assert lr_at(0, 1, TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=0)) == pytest.approx(1.0)  # as above


def test_batch_rows_cover_each_epoch_once_and_depend_only_on_seed_and_position():
    stream = batch_rows(10, 0, 30, seed=3)  # three epochs
    for epoch in range(3):
        assert sorted(stream[epoch * 10:(epoch + 1) * 10].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:20])  # reshuffled per epoch
    straddling = torch.cat([batch_rows(10, 0, 7, 3), batch_rows(10, 7, 23, 3)])  # batches across epochs
    assert torch.equal(straddling, stream)
    assert not torch.equal(batch_rows(10, 0, 10, seed=4), stream[:10])


def test_checkpoint_swap_survives_a_crash_between_the_renames(tmp_path):
    import os
    import random

    import numpy as np

    ckpt.save(tmp_path, {"x": torch.ones(2), "rng": ckpt.rng_state()}, ckpt.Progress(step=2, total_steps=9))
    os.replace(tmp_path / "checkpoint", tmp_path / ".checkpoint.old")  # killed after the first rename
    assert ckpt.latest(tmp_path) == tmp_path / ".checkpoint.old"
    state = ckpt.load(ckpt.latest(tmp_path))
    assert state["progress"]["step"] == 2
    assert ckpt.read_progress(ckpt.latest(tmp_path)).best_val_loss == math.inf
    draws = lambda: (torch.rand(3), random.random(), np.random.rand())  # noqa: E731
    first = draws()
    ckpt.set_rng_state_(state["rng"])
    assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(first, draws()))
    ckpt.save(tmp_path, {"x": torch.zeros(2)}, ckpt.Progress(step=4))
    assert ckpt.latest(tmp_path) == tmp_path / "checkpoint" and not (tmp_path / ".checkpoint.old").exists()
    assert ckpt.read_progress(tmp_path / "checkpoint").step == 4


# ---------------------------------------------------------------- the step

def _pair(models):
    from transformers import AutoModelForCausalLM

    return (AutoModelForCausalLM.from_pretrained(models["student"]),
            AutoModelForCausalLM.from_pretrained(models["teacher"]).eval())


def test_intermediate_loss_with_different_widths_trains_the_map(models):
    student, teacher = _pair(models)
    tc = load_config(None, ["distill.intermediate=true", "distill.embedding_loss=true"]).distill
    trainee, teacher_mod = build(student, teacher, tc, CPU)
    assert trainee.objective.layer_map == ((0, 0), (0, 1))  # embeddings + block output at last-2 of each
    assert tuple(trainee.hidden_map.weight.shape) == (32, 16)  # student 16 -> teacher 32
    ids = torch.randint(1, 300, (2, 12))
    mask = torch.ones_like(ids)
    parts = trainee(ids, mask, teacher_mod(ids, mask))
    parts["loss"].backward()
    assert parts["loss_intermediate"] > 0
    torch.testing.assert_close(parts["alpha"] * parts["loss_intermediate"], parts["loss_logits"])
    assert trainee.hidden_map.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_padding_contributes_nothing(models):
    student, teacher = _pair(models)
    kd = load_config(None, ["distill.intermediate=true", "distill.ce_weight=0.5"]).distill
    for tc, with_teacher in ((kd, teacher), (TrainConfig(), None)):  # distill, then plain CE
        trainee, teacher_mod = build(student, with_teacher, tc, CPU)
        ids = torch.randint(1, 300, (2, 12))
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0
        other = ids.clone()
        other[1, 8:] = 7  # only padded positions differ
        losses = [trainee(x, mask, teacher_mod(x, mask) if teacher_mod is not None else None)["loss"]
                  for x in (ids, other)]
        torch.testing.assert_close(losses[0], losses[1])


def test_micro_batches_give_the_same_step_as_one_batch(models):
    rows = torch.randint(1, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for micro in (4, 2, 1):
        student, teacher = _pair(models)
        tc = load_config(None, ["distill.ce_weight=0.3"]).distill
        trainee, teacher_mod = build(student, teacher, tc, CPU)
        metrics = train_step(trainee, teacher_mod, make_optimizer(trainee, tc), rows, micro, tc, CPU)
        results.append((metrics, [p.detach().clone() for p in trainee.parameters()]))
    for metrics, params in results[1:]:
        # float32 forwards of 4, 2 or 1 rows round differently (~1e-7 per op), weighted sums in float64: measured
        # 3.5e-8 on the loss; the grad norm (float32 gradients accumulated in another order, a float32 sum of
        # squares) measured equal
        assert metrics["loss"] == pytest.approx(results[0][0]["loss"], rel=1e-5)
        assert metrics["grad_norm"] == pytest.approx(results[0][0]["grad_norm"], rel=1e-4)
        for a, b in zip(params, results[0][1]):
            # one AdamW step at the warm-up lr 1e-5: lr * g / (|g| + eps) is about lr * sign(g), so the gradients'
            # rounding barely reaches the weights (measured 1.1e-8); a flipped sign would move a weight by 2e-5
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_students_distilled_together_end_as_each_alone(models, tmp_path):
    """Two students stepping on one teacher forward per micro-batch end with exactly the weights and validation
    loss that each reaches distilled on its own (the search's brief trials)."""
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(0)
    train, val = torch.randint(1, 300, (16, 16), generator=g), torch.randint(1, 300, (4, 16), generator=g)
    tc = load_config(None, ["distill.steps=3", "distill.batch_size=4", "distill.micro_batch_size=2",
                            "distill.warmup_steps=1", "distill.ce_weight=0.2"]).distill
    session = Session(tmp_path, CPU, seed=5, save=False)
    teacher = AutoModelForCausalLM.from_pretrained(models["teacher"]).eval()
    fresh = [AutoModelForCausalLM.from_pretrained(models[name]) for name in ("student", "teacher")]
    calls = []
    teacher.model.register_forward_hook(lambda *args: calls.append(1))  # the decoder: Teacher skips the head
    together = fit(fresh, train, val, tc, session, teacher)
    assert len(calls) == 3 * 2  # steps x micro-batches: one teacher forward serves both students
    for model, result, name in zip(fresh, together, ("student", "teacher")):
        alone = AutoModelForCausalLM.from_pretrained(models[name])
        expected = fit(alone, train, val, tc, session, teacher=teacher)
        # fit validates with the teacher (the head then runs on every position, not only those with a target:
        # another matmul shape), students trained together without: float32 rounding only, measured 4.5e-8
        assert result["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-6)
        for a, b in zip(model.parameters(), alone.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # exact: the same steps in the same order


def test_validation_matches_evaluate(models):
    from compactlm.metrics import perplexity, teacher_agreement

    student, teacher = _pair(models)
    trainee, teacher_mod = build(student, teacher, load_config(None, []).distill, CPU)
    rows = torch.randint(1, 300, (5, 16), generator=torch.Generator().manual_seed(0))
    val = validate(trainee, teacher_mod, rows, 2, CPU)
    batches = [{"input_ids": rows, "attention_mask": torch.ones_like(rows)}]
    # validate runs micro-batches of 2 rows, perplexity all 5 at once: float32 forwards round differently (~1e-7
    # per op, 2 layers), sums in float64; measured 9e-8
    assert val["val_loss"] == pytest.approx(perplexity(student, batches)["loss"], rel=1e-5)
    agreement = teacher_agreement(student, teacher, batches)
    # the KL is a small difference of log-probabilities, so the logits' rounding weighs more in it than in the
    # loss: 10x the loss's bound (measured equal here)
    assert val["val_kl"] == pytest.approx(agreement["kl"], rel=1e-4)
    assert val["val_top1"] == pytest.approx(agreement["top1_agreement"])  # the same argmax matches: equal
    assert trainee.training  # validation restores train mode


def test_bfloat16_teacher_teaches_a_float32_student(models):
    """dtype=bfloat16 loads the teacher in bf16; the student always trains in float32."""
    student, teacher = _pair(models)
    tc = load_config(None, ["distill.intermediate=true"]).distill
    trainee, teacher_mod = build(student, teacher.to(torch.bfloat16), tc, CPU)
    rows = torch.randint(1, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    metrics = train_step(trainee, teacher_mod, make_optimizer(trainee, tc), rows, 2, tc, CPU)
    assert math.isfinite(metrics["loss"]) and next(student.parameters()).dtype == torch.float32
    assert math.isfinite(validate(trainee, teacher_mod, rows, 2, CPU)["val_kl"])


# ---------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def distilled(models, text_file, tmp_path_factory) -> tuple[Path, dict]:
    """One finished in-process distill run with the intermediate and embedding losses on."""
    out = tmp_path_factory.mktemp("distilled")
    cfg = load_config(None, _args(models, text_file, out, **{"distill.intermediate": True,
                                                              "distill.embedding_loss": True}))
    return out, run_distill(cfg)


def test_distill_run_outputs(distilled):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, result = distilled
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 7))
    expected = {"step", "tokens", "loss", "lr", "tokens_per_s", "grad_norm", "loss_logits", "alpha"}
    assert all(expected <= row.keys() for row in rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    assert all({"val_kl", "val_top1", "val_ppl"} <= set(r) for r in rows if "val_loss" in r)
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns
    assert rows[-1]["tokens"] == 6 * 4 * 32 == result["tokens"]
    # one float, returned and logged (JSON keeps a float exactly): equal; approx's default rel 1e-6
    assert result["steps"] == 6 and result["val_loss"] == pytest.approx(rows[-1]["val_loss"])
    assert result["best_val_loss"] == min(r["val_loss"] for r in rows if "val_loss" in r)
    for name in ("best", "final"):
        model = AutoModelForCausalLM.from_pretrained(out / name)
        assert model.config.hidden_size == 16 and AutoTokenizer.from_pretrained(out / name) is not None
        assert not any(k.startswith("hidden_map") for k in _weights(out / name))
    assert (out / "compactlm.yaml").is_file()
    state = ckpt.load(ckpt.latest(out))
    assert state["hidden_map"]["weight"].shape == (32, 16) and state["progress"]["step"] == 6
    assert {"model", "optimizer", "scheduler", "rng"} <= set(state)


def test_existing_checkpoint_needs_resume(distilled, models, text_file):
    out, _ = distilled
    with pytest.raises(CompactLMError, match="resume=true"):
        run_distill(load_config(None, _args(models, text_file, out)))


def test_resuming_a_finished_run_changes_nothing(distilled, models, text_file):
    out, result = distilled
    before, rows_before = _weights(out / "final"), _metrics(out)
    again = run_distill(load_config(None, _args(models, text_file, out, resume=True, **{
        "distill.intermediate": True, "distill.embedding_loss": True})))
    assert again["steps"] == 6 and again["val_loss"] == pytest.approx(result["val_loss"])  # no step runs: equal
    torch.testing.assert_close(_weights(out / "final"), before)
    assert _metrics(out) == rows_before


def test_train_random_init_differs_from_pretrained(models, text_file, tmp_path):
    keys = {"model": models["student"], "train.steps": 8, "train.batch_size": 2, "train.seq_len": 32,
            "train.lr": 0.003, "train.warmup_steps": 1, "train.eval_every": 0, "train.eval_sequences": 4,
            "train.save_every": 0, "train.activation_checkpointing": True, "data": text_file}
    runs = {}
    for init in ("pretrained", "random"):
        run_keys = keys | {"init": init, "out_dir": tmp_path / init}
        cfg = load_config(None, [f"{k}={v}" for k, v in run_keys.items()])
        runs[init] = run_train(cfg)
        rows = _metrics(tmp_path / init)
        assert rows[-1]["loss"] < rows[0]["loss"] and "val_kl" not in rows[-1]
    first = _weights(tmp_path / "pretrained" / "final")
    second = _weights(tmp_path / "random" / "final")
    # the two inits end 0.15 apart in weights and 4e-3 (relative) in val_loss (measured): far outside the defaults
    # (rtol 1e-5, rel 1e-6), which only an identical run would meet
    assert any(not torch.allclose(first[k], second[k]) for k in first)
    assert runs["random"]["val_loss"] != pytest.approx(runs["pretrained"]["val_loss"])


def test_bad_inputs_are_one_line_errors(models, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(tmp_path / "vocab64")
    (tmp_path / "empty.txt").write_text("\n\n")
    cases = [
        (["student=x"], "teacher=MODEL"),
        ([f"teacher={tmp_path / 'vocab64'}"], "vocabulary of 64"),
        (["distill.seq_len=512"], "distill.seq_len=512"),
        ([f"data={tmp_path / 'empty.txt'}"], "no non-empty text"),
        (["distill.micro_batch_size=3"], "distill.batch_size=4"),
        (["distill.tokens=10", "distill.steps=null"], "less than one global batch"),
    ]
    for extra, message in cases:
        args = _args(models, text_file, tmp_path / "out") + extra
        if extra[0] == "student=x":
            args = [a for a in args if not a.startswith(("teacher=", "student="))]
        with pytest.raises(CompactLMError, match=message) as err:
            run_distill(load_config(None, args))
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- SIGKILL and resume, through the real CLI

def _cli(args: list[str], log: Path) -> subprocess.Popen:
    """`python -m compactlm distill ...` in a subprocess; stderr (progress, logs) goes to `log`."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                        "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as err:  # a file, not a pipe: a full pipe would stall the run
        return subprocess.Popen([sys.executable, "-m", "compactlm", "distill", *args], env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)


def test_sigkill_then_resume_ends_like_an_uninterrupted_run(models, text_file, tmp_path):
    keys = {"distill.steps": 24, "distill.eval_every": 8, "distill.intermediate": True}
    killed = tmp_path / "killed"
    code = run_killed_at_checkpoint(["distill", *_args(models, text_file, killed, **keys)], 10,
                                    tmp_path / "killed.log")
    log = (tmp_path / "killed.log").read_text()[-2000:]
    assert code == -signal.SIGKILL, f"the run ended before it was killed: {log}"
    assert ckpt.read_progress(ckpt.latest(killed)).step == 10 and not (killed / "final").exists()
    assert [r["step"] for r in _metrics(killed)] == list(range(1, 11))

    resumed = _cli(_args(models, text_file, killed, resume=True, **keys), tmp_path / "resumed.log")
    reference = tmp_path / "reference"
    run_distill(load_config(None, _args(models, text_file, reference, **keys)))  # meanwhile, in this process
    stdout, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, (tmp_path / "resumed.log").read_text()[-2000:]
    assert json.loads(stdout.strip().splitlines()[-1])["steps"] == 24
    torch.testing.assert_close(_weights(killed / "final"), _weights(reference / "final"))
    got, want = _metrics(killed), _metrics(reference)
    assert [r["step"] for r in got] == list(range(1, 25))  # rows written after the checkpoint were dropped
    for key in ("loss", "lr", "val_loss"):
        # resume restores weights, optimizer state and RNG, both runs on one thread: the same operations, measured
        # equal; 1e-5 is a float32 margin, far below what a different batch or step changes
        assert_column_close(got, want, key, rel=1e-5)



def test_hidden_map_starts_as_the_pruning_plan(tiny_checkpoint, text_file, tmp_path, capsys):
    """Bug: the student->teacher hidden map started as channel j -> j, but after hidden pruning student channel
    j is teacher channel plan.hidden[j]: the first intermediate loss was far from the pruned model's own."""
    from compactlm.cli import main

    pruned, out = tmp_path / "pruned", tmp_path / "kd"
    common = [f"data={text_file}", "calib.sequences=8", "calib.seq_len=32", "calib.batch_size=4"]
    assert main(["prune", f"model={tiny_checkpoint}", f"out_dir={pruned}", "target.hidden_size=24",
                 "importance.method=random", "seed=3", *common]) == 0, capsys.readouterr().err
    keep = json.loads((pruned / "plan.json").read_text())["hidden"]
    assert keep != list(range(24))  # a plan where j -> j is wrong
    assert main(["distill", f"teacher={tiny_checkpoint}", f"student={pruned}", f"out_dir={out}",
                 "distill.steps=1", "distill.batch_size=2", "distill.seq_len=32", "distill.lr=1e-9", "distill.min_lr=0",
                 "distill.warmup_steps=1", "distill.intermediate=true", "distill.embedding_loss=true",
                 "distill.eval_every=0", "distill.eval_sequences=2", *common]) == 0, capsys.readouterr().err
    first = _metrics(out)[0]
    # The pruned student's states are the teacher's on the kept channels (exactly so for the embedding), so the
    # cosine loss starts small; mapped j -> j it starts near 1 (unrelated channels).
    assert first["loss_intermediate"] < 0.3, first
    mapping = ckpt.load(ckpt.latest(out))["hidden_map"]["weight"]  # (32, 24)
    assert mapping.argmax(0).tolist() == keep


# ---------------------------------------------------------------- the teacher's top-K targets, cached

def test_cached_top_k_distillation_runs_and_reuses_its_cache(models, text_file, tmp_path):
    """distill.teacher_top_k: the teacher's targets are cached once per row (then reused by a second run with
    the same teacher and rows), training learns, and validation still measures KL against the teacher."""
    keys = {"distill.teacher_top_k": 8, "distill.teacher_targets": "top_k", "distill.teacher_cache": tmp_path / "cache"}
    result = run_distill(load_config(None, _args(models, text_file, tmp_path / "a", **keys)))
    rows = _metrics(tmp_path / "a")
    assert result["steps"] == 6 and rows[-1]["loss"] < rows[0]["loss"] and "val_kl" in rows[-1]
    (folder,) = (tmp_path / "cache").iterdir()
    shards = sorted(folder.glob("shard-*.safetensors"))
    assert folder.name.startswith("k8-t1-") and len(shards) == 1  # 6 steps x 4 rows read: one shard of 64 positions
    assert load_file(shards[0])["ids"].shape == (64, 32, 8)  # only the rows the run reads, not every train row
    stamps = [p.stat().st_mtime_ns for p in shards]
    run_distill(load_config(None, _args(models, text_file, tmp_path / "b", **keys)))
    assert [p.stat().st_mtime_ns for p in shards] == stamps  # the second run read the cache, wrote nothing


def test_sampled_teacher_targets_distil_from_their_own_cache(models, text_file, tmp_path):
    """distill.teacher_targets=sampled (the default): the cache holds K draws' shares (its own key), and training
    learns."""
    keys = {"distill.teacher_top_k": 8, "distill.teacher_cache": tmp_path / "c"}
    result = run_distill(load_config(None, _args(models, text_file, tmp_path / "a", **keys)))
    rows = _metrics(tmp_path / "a")
    assert result["steps"] == 6 and rows[-1]["loss"] < rows[0]["loss"] and "val_kl" in rows[-1]
    (folder,) = (tmp_path / "c").iterdir()
    assert folder.name.startswith("s8-t1-")
    logp = load_file(next(folder.glob("shard-*.safetensors")))["logp"].float()
    assert (logp.exp() == 0).any() and torch.allclose(logp.exp().sum(-1), torch.ones(()), atol=5e-3)  # float16 shares


def test_top_k_with_the_whole_vocabulary_trains_like_dense_kd(models, text_file, tmp_path):
    """K = V: the cached targets are the teacher's whole distribution, rounded to float16 (log-probabilities to
    about 1e-3 nats), so the run follows dense KD up to that rounding."""
    vocab = AutoConfig.from_pretrained(models["teacher"]).vocab_size
    dense = run_distill(load_config(None, _args(models, text_file, tmp_path / "dense")))
    cached = run_distill(load_config(None, _args(models, text_file, tmp_path / "cached",
                                                 **{"distill.teacher_top_k": vocab, "distill.teacher_targets": "top_k"})))
    got, want = _metrics(tmp_path / "cached"), _metrics(tmp_path / "dense")
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(got, want)) < 5e-4  # KL of about 0.01 here
    assert cached["val_loss"] == pytest.approx(dense["val_loss"], rel=1e-5)  # measured 4e-6


def test_cached_kd_sigkill_then_resume_ends_like_an_uninterrupted_cached_run(models, text_file, tmp_path):
    keys = {"distill.steps": 16, "distill.eval_every": 8, "distill.teacher_top_k": 8}
    killed = tmp_path / "killed"
    code = run_killed_at_checkpoint(["distill", *_args(models, text_file, killed, **keys)], 6, tmp_path / "killed.log")
    assert code == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    resumed = _cli(_args(models, text_file, killed, resume=True, **keys), tmp_path / "resumed.log")
    reference = tmp_path / "reference"
    run_distill(load_config(None, _args(models, text_file, reference, **keys)))
    stdout, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, (tmp_path / "resumed.log").read_text()[-2000:]
    torch.testing.assert_close(_weights(killed / "final"), _weights(reference / "final"))
    assert_column_close(_metrics(killed), _metrics(reference), "loss", rel=1e-5)  # as in the dense kill test


def test_top_k_refuses_the_hidden_state_losses():
    with pytest.raises(CompactLMError, match="teacher_top_k"):
        load_config(None, ["distill.teacher_top_k=8", "distill.intermediate=true"])


def test_divergence_keys_are_checked():
    with pytest.raises(CompactLMError, match="teacher_top_k.*forward_kl only"):
        load_config(None, ["distill.teacher_top_k=8", "distill.divergence=reverse_kl"])
    with pytest.raises(CompactLMError, match="distill.divergence"):
        load_config(None, ["distill.divergence=kl"])
    with pytest.raises(CompactLMError, match="skew"):
        load_config(None, ["distill.skew=0"])
    assert load_config(None, ["distill.divergence=jsd", "distill.skew=0.5"]).distill.divergence == "jsd"


@pytest.mark.parametrize("family", FAMILIES)
def test_losses_use_the_logits_the_model_computes(family, token_batch):
    """The chunked losses and the evaluator run the LM head themselves: for every family they must compute the
    logits the model's own forward does (Gemma 2's soft-cap included), in loss, KL and perplexity."""
    from compactlm.distill.losses import kd_loss_reference
    from compactlm.distill.trainee import Objective, Teacher, Trainee
    from compactlm.metrics import next_token_labels

    kv = 4 if family == "gpt2" else 2
    teacher, student = tiny_model(family, 4, kv, seed=0), tiny_model(family, 4, kv, seed=1)
    if family == "gemma2":
        assert student.config.final_logit_softcapping is not None
    ids, mask = token_batch["input_ids"], token_batch["attention_mask"]
    with torch.no_grad():
        s_logits, t_logits = (m(input_ids=ids, attention_mask=mask).logits for m in (student, teacher))
    labels = next_token_labels(ids, mask)
    objective = Objective(distill=True, temperature=2.0, ce_weight=0.5, chunk_tokens=7)
    t_out = Teacher(teacher)(ids, mask)
    loss = Trainee(student, objective)(ids, mask, t_out)["loss"]
    want = kd_loss_reference(s_logits, t_logits, mask, 2.0, 0.5, labels)
    # float32: the head runs on gathered positions (another matmul shape than the model's), and our sums are
    # float64 where the reference's are float32: measured <= 2.3e-7 relative on losses of ~4, here and below
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    jsd = Objective(distill=True, temperature=2.0, ce_weight=0.5, chunk_tokens=7, divergence="jsd", skew=0.3)
    loss = Trainee(student, jsd)(ids, mask, t_out)["loss"]
    want = kd_loss_reference(s_logits, t_logits, mask, 2.0, 0.5, labels, divergence="jsd", skew=0.3)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)  # as above
    ce = Trainee(student, Objective(chunk_tokens=7))(ids, mask)["loss"]
    want_ce = torch.nn.functional.cross_entropy(s_logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(ce, want_ce, rtol=1e-5, atol=1e-5)
    sums = Trainee(student, objective)(ids, mask, t_out, evaluate=True)["sums"]
    torch.testing.assert_close(sums[0] / sums[1], want_ce.double(), rtol=1e-5, atol=1e-5)  # as above


# ---------------------------------------------------------------- compute precision and threads

def test_autocast_key_resolves_per_device(monkeypatch):
    from compactlm.distill import precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert precision.autocast_dtype("off", cuda) is None and precision.autocast_dtype("bf16", cpu) == torch.bfloat16
    assert precision.autocast_dtype("auto", cuda) == torch.bfloat16
    for native in (True, False):  # auto on a CPU: bf16 only where it multiplies bf16 natively
        monkeypatch.setattr(precision, "native_bf16_cpu", lambda native=native: native)
        assert precision.autocast_dtype("auto", cpu) == (torch.bfloat16 if native else None)
    with pytest.raises(CompactLMError, match="autocast: 'fp8' is not one of auto, bf16, off"):
        load_config(None, ["autocast=fp8"])


def test_bf16_autocast_reaches_both_forwards_and_keeps_the_loss(models):
    student, teacher = _pair(models)
    tc = load_config(None, ["distill.ce_weight=0.5"]).distill
    ids = torch.randint(1, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    losses, hidden = {}, {}
    for dtype in (None, torch.bfloat16):
        trainee, teacher_mod = build(student, teacher, tc, CPU, autocast=dtype)
        out = teacher_mod(ids, mask)
        hidden[dtype], losses[dtype] = out.hidden, trainee(ids, mask, out)["loss"]
        losses[dtype].backward()
        assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
                   for p in trainee.parameters())  # weights and gradients stay float32 (autocast, not a cast)
    assert not torch.equal(hidden[None], hidden[torch.bfloat16])  # the teacher's forward ran in bf16
    assert losses[torch.bfloat16].item() != losses[None].item()  # and the student's
    # bf16 rounds each product's inputs to 8 significant bits (2^-9 = 0.2% relative); through 3 tiny layers the
    # loss moved 0.1% (measured): 2% bounds it with room and still fails a forward that is not bf16-like at all
    assert losses[torch.bfloat16].item() == pytest.approx(losses[None].item(), rel=2e-2)


def test_compactlm_leaves_torch_threads_as_it_finds_them(distilled, models, text_file, tmp_path):
    """compactlm never sets torch's thread count (the README says why a shared core slows a run): importing it
    keeps torch's default, and a whole distill run keeps what the caller set (this module's fixture: 1)."""
    code = ("import torch; n = torch.get_num_threads(); "
            "import compactlm.cli, compactlm.pipeline, compactlm.stages, compactlm.distill.loop; "
            "assert torch.get_num_threads() == n, (n, torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env | {"PYTHONPATH": SRC})
    assert torch.get_num_threads() == 1
    run_distill(load_config(None, _args(models, text_file, tmp_path / "run", **{"distill.steps": 2})))
    assert torch.get_num_threads() == 1
