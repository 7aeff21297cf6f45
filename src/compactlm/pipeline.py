"""`compactlm run`: teacher correction, score, search or explicit target, prune, distill, evaluate, report.

Each stage writes into its own folder of the run directory and marks itself done with a `stage.json`
written last; rerunning the command skips finished stages and resumes distillation at its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from compactlm.config import Config, save_config
from compactlm.errors import CompactLMError

log = logging.getLogger(__name__)

DONE = "stage.json"


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    what: str
    fn: Callable[[Config, Path], dict]


def _run_dir(cfg: Config) -> Path:
    return Path(cfg.out_dir)


def teacher_spec(cfg: Config) -> str:
    """The teacher used for scoring and distillation: the corrected one when correction is enabled."""
    return str(_run_dir(cfg) / "correction" / "final") if cfg.correction.enabled else cfg.model


def _correct(cfg: Config, out: Path) -> dict:
    from compactlm.distill.run import run_train

    # init=random makes this stage train the teacher from scratch (the seed project's Tiny Shakespeare GPT)
    return run_train(dataclasses.replace(cfg, train=cfg.correction, out_dir=str(out), resume=True))


def _score(cfg: Config, out: Path) -> dict:
    from compactlm import stages

    scores = stages.score(dataclasses.replace(cfg, model=teacher_spec(cfg), out_dir=str(out)))
    return {"scores": str(out / stages.SCORES_FILE), "layer_metrics": sorted(scores.layers)}


def _search(cfg: Config, out: Path) -> dict:
    from compactlm import stages

    scores = _run_dir(cfg) / "score" / stages.SCORES_FILE
    return run_search(dataclasses.replace(cfg, model=teacher_spec(cfg), importance=dataclasses.replace(
        cfg.importance, scores=str(scores))), out)


def run_search(cfg: Config, out: Path) -> dict:
    """Rank candidate shapes by zero-shot loss, distill the best `search.top_k` briefly, pick one; write the table."""
    from compactlm import data, search, stages
    from compactlm.models.family import family_of
    from compactlm.pruning import depth_metrics_needed

    teacher, tokenizer = stages.load(cfg)
    splits = stages.load_splits(cfg, tokenizer, cfg.eval.seq_len)
    val = list(data.batches(splits.val[: cfg.eval.sequences], cfg.eval.batch_size))
    source = family_of(teacher).dims(teacher.config)
    depths = {c.dims.layers for c in search.enumerate_candidates(teacher, cfg.search)}  # cheap: counts only
    needed = depth_metrics_needed(cfg.target, [source.layers - n for n in depths])
    scores = stages.scores_for(cfg, teacher, tokenizer, needed)
    rows = stages.load_splits(cfg, tokenizer, cfg.distill.seq_len)  # (N, distill.seq_len) train and val
    chosen, ranked = search.search(
        teacher, scores, cfg.search, val, layer_metric=cfg.target.layer_metric,
        keep_last_layer=cfg.target.keep_last_layer, progress=True,
        distill_fn=lambda student: _brief_distill(cfg, student, teacher, rows, out),
    )
    with stages.staged_output(out) as tmp:
        search.write_table(ranked, chosen, tmp / "search.md", tmp / "search.json")
    shape = {"hidden_size": chosen.dims.hidden, "intermediate_size": chosen.dims.ffn,
             "num_attention_heads": chosen.dims.heads, "num_key_value_heads": chosen.dims.kv_heads,
             "num_hidden_layers": chosen.dims.layers}
    return {"target": shape, "params": chosen.params, "candidates": len(ranked)}


def _brief_distill(cfg: Config, student, teacher, rows, out: Path) -> float:
    """Validation loss of `student` after `search.distill_steps` steps of distillation (a trial: nothing kept)."""
    import shutil
    import tempfile

    from compactlm.distill.distributed import setup
    from compactlm.distill.loop import Session, fit

    tc = dataclasses.replace(cfg.distill, steps=cfg.search.distill_steps, eval_every=None, save_every=None, warmup_steps=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".search-distill.", dir=out.parent))  # only metrics.jsonl lands here
    try:
        session = Session(scratch, setup(cfg.device), None, cfg.seed, save=False)
        result = fit(student, rows.train, rows.val[: tc.eval_sequences], tc, session, teacher=teacher)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return float(result["val_loss"])


def search_only(cfg: Config) -> dict:
    """`compactlm search`: the search stage alone, into out_dir (search.md, search.json)."""
    if not cfg.search.target_params:
        raise CompactLMError("search needs search.target_params (e.g. 70M, or 0.5 of the teacher)")
    return run_search(cfg, Path(cfg.out_dir))


def target_of(cfg: Config) -> Config:
    """The config with `target.*` filled from the search's choice when a search ran."""
    chosen = _run_dir(cfg) / "search" / DONE
    if not cfg.search.target_params or not chosen.is_file():
        return cfg
    shape = json.loads(chosen.read_text())["target"]
    return dataclasses.replace(cfg, target=dataclasses.replace(cfg.target, **shape))


def _prune(cfg: Config, out: Path) -> dict:
    from compactlm import stages

    cfg = target_of(cfg)
    scores = _run_dir(cfg) / "score" / stages.SCORES_FILE
    stages.prune(dataclasses.replace(
        cfg, model=teacher_spec(cfg), out_dir=str(out), importance=dataclasses.replace(cfg.importance, scores=str(scores))
    ))
    return json.loads((out / stages.PLAN_FILE).read_text())["params"]


def _distill(cfg: Config, out: Path) -> dict:
    from compactlm.distill.run import run_distill

    student = str(_run_dir(cfg) / "prune")
    return run_distill(dataclasses.replace(
        cfg, teacher=teacher_spec(cfg), student=student, out_dir=str(out), resume=True, init="pretrained"))


MODELS = ("teacher", "pruned", "distilled")


def _model_dirs(cfg: Config) -> dict[str, str]:
    run_dir = _run_dir(cfg)
    return {"teacher": teacher_spec(cfg), "pruned": str(run_dir / "prune"), "distilled": str(run_dir / "distill" / "final")}


def _evaluate(cfg: Config, out: Path) -> dict:
    """Perplexity, KL, agreement, speed (and lm-eval tasks) of teacher, pruned and distilled on held-out text."""
    from compactlm import data, stages
    from compactlm.evaluate import evaluate, sample_text
    from compactlm.models.family import family_of

    teacher, tokenizer = stages.load(cfg, teacher_spec(cfg))
    val = stages.load_splits(cfg, tokenizer, cfg.eval.seq_len).val[: cfg.eval.sequences]
    batches = list(data.batches(val, cfg.eval.batch_size))
    results = {}
    for name, spec in _model_dirs(cfg).items():
        model = teacher if name == "teacher" else stages.load(cfg, spec)[0]
        metrics = evaluate(model, batches, teacher=None if name == "teacher" else teacher, tokenizer=tokenizer,
                           speed=cfg.eval.speed, progress=True)
        metrics |= {"dims": vars(family_of(model).dims(model.config)), "sample": sample_text(
            model, tokenizer, cfg.eval.prompt, new_tokens=cfg.eval.gen_tokens)}
        if cfg.eval.tasks:
            metrics["tasks"] = stages.task_metrics(cfg, model, tokenizer)
        results[name] = metrics
    with stages.staged_output(out) as tmp:
        (tmp / "eval.json").write_text(json.dumps(results, indent=1) + "\n")
    return {name: {k: v for k, v in m.items() if k in ("params", "perplexity", "kl")} for name, m in results.items()}


def _report(cfg: Config, out: Path) -> dict:
    """report.md and PNG plots in the run directory, from what the other stages wrote."""
    from compactlm import report
    from compactlm.importance.scores import Scores

    run_dir = _run_dir(cfg)
    results = json.loads((run_dir / "evaluate" / "eval.json").read_text())
    scores = Scores.load(run_dir / "score" / "scores.safetensors")
    report.plot_width_importance(scores, run_dir / "importance_width.png")
    report.plot_layer_importance(scores, run_dir / "importance_layers.png")
    runs = [p for p in (run_dir / "correction" / "metrics.jsonl", run_dir / "distill" / "metrics.jsonl") if p.is_file()]
    report.plot_training(runs, run_dir / "training.png")
    plots = {"Width importance": "importance_width.png", "Layer importance": "importance_layers.png",
             "Training and validation loss": "training.png"}
    if (run_dir / "search" / "search.json").is_file():
        report.plot_search(json.loads((run_dir / "search" / "search.json").read_text())["candidates"], run_dir / "search.png")
        plots["Search candidates"] = "search.png"
    arch = lambda name: results[name]["dims"] | {"params": results[name]["params"]}  # noqa: E731
    path = report.write_report(
        run_dir, teacher=arch("teacher"), student=arch("distilled"),
        stages={name: results[name] for name in MODELS}, plots=plots,
        samples={name: cfg.eval.prompt + results[name]["sample"] for name in MODELS},
        notes=[f"config: {run_dir / 'compactlm.yaml'}", f"distillation metrics: {run_dir / 'distill' / 'metrics.jsonl'}"],
    )
    out.mkdir(parents=True, exist_ok=True)
    return {"report": str(path)}


def plan_stages(cfg: Config) -> list[Stage]:
    """The stages this config runs, in order."""
    out = []
    if cfg.correction.enabled:
        out.append(Stage("correction", f"fine-tune the teacher {cfg.model} on {cfg.data} (teacher correction)", _correct))
    out.append(Stage("score", f"importance of channels, heads, neurons and layers ({cfg.importance.method})", _score))
    if cfg.search.target_params:
        out.append(Stage("search", f"search architectures of ~{cfg.search.target_params} parameters", _search))
    out.append(Stage("prune", "cut the teacher to the target and save a Hugging Face checkpoint", _prune))
    out.append(Stage("distill", f"distill from the teacher for {cfg.distill.steps or cfg.distill.tokens} "
                     f"{'steps' if cfg.distill.steps else 'tokens'}", _distill))
    out.append(Stage("evaluate", "perplexity, KL, agreement and speed: teacher, pruned, distilled", _evaluate))
    out.append(Stage("report", "report.md and plots", _report))
    return out


def check(cfg: Config) -> None:
    """Checks that need no model: run directory, explicit target or search, data source, model spec."""
    from compactlm.data import BUILTIN_DATA
    from compactlm.models.loading import BUILTINS

    if not cfg.out_dir:
        raise CompactLMError("run needs out_dir=DIR (the run directory)")
    if not cfg.search.target_params and not any(
        getattr(cfg.target, k) is not None for k in
        ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "drop_layers")
    ):
        raise CompactLMError("run needs a target: set target.* keys or search.target_params")
    if cfg.search.target_params and isinstance(cfg.search.target_params, float) and not 0 < cfg.search.target_params <= 1:
        raise CompactLMError(f"search.target_params={cfg.search.target_params}: a fraction must lie in (0, 1]")
    model = cfg.model
    if model not in BUILTINS and (model.startswith((".", "/", "~")) or model.endswith(".gguf")) and not Path(model).exists():
        raise CompactLMError(f"model path {model} does not exist")
    data = cfg.data
    if data not in BUILTIN_DATA and (data.startswith((".", "/", "~")) or Path(data).suffix) and not Path(data).exists():
        raise CompactLMError(f"data file not found: {data}")


def dry_run(cfg: Config) -> list[str]:
    """The lines `run --dry-run` prints: what would run, what is already done. Loads no model."""
    check(cfg)
    lines = [f"run directory: {cfg.out_dir}"]
    for i, stage in enumerate(plan_stages(cfg), 1):
        done = " (done)" if (_run_dir(cfg) / stage.name / DONE).is_file() else ""
        lines.append(f"{i}. {stage.name}: {stage.what}{done}")
    return lines


def run(cfg: Config) -> dict:
    """Run every stage not yet done, in order; returns each stage's summary."""
    from compactlm.chartok import prepare_tokenizer

    check(cfg)
    run_dir = _run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = prepare_tokenizer(cfg, run_dir)  # tokenizer=char: built from cfg.data into run_dir/tokenizer
    save_config(cfg, run_dir / "compactlm.yaml")
    summary = {}
    for stage in plan_stages(cfg):
        marker = run_dir / stage.name / DONE
        if marker.is_file():
            log.info("stage %s: done, skipping", stage.name)
            summary[stage.name] = json.loads(marker.read_text())
            continue
        log.info("stage %s: %s", stage.name, stage.what)
        start = time.perf_counter()
        result = stage.fn(cfg, run_dir / stage.name)
        result = {**result, "seconds": round(time.perf_counter() - start, 1)}
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(marker)
        summary[stage.name] = result
    return summary
