"""`compactlm run`: the stages in order (teacher correction, score, search or explicit target, prune, distill,
evaluate, GGUF export when export.type is set, report), each in its own folder of the run directory, resumable.

This module only orders and resumes: a `Stage` is a function of stages.py plus the config it gets inside the
run directory. Each stage marks itself done with a `stage.json` written last; rerunning the command skips
finished stages and resumes distillation at its checkpoint. A rerun with a config that changes what the run
computes is refused (config.MAY_CHANGE_ON_RESUME lists what may change).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from compactlm import stages
from compactlm.config import Config, check_resume, save_config
from compactlm.errors import CompactLMError

log = logging.getLogger(__name__)

DONE = "stage.json"


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    what: str
    fn: Callable[[Config], dict]  # a stage of stages.py
    configure: Callable[[Config, Path], Config]  # (run config, run directory) -> this stage's config


def teacher_spec(cfg: Config, run: Path) -> str:
    """The teacher used for scoring and distillation: the corrected one when correction is enabled."""
    return str(run / "correction" / "final") if cfg.correction.enabled else cfg.model


def _with_scores(cfg: Config, run: Path) -> Config:
    return dataclasses.replace(cfg, importance=dataclasses.replace(
        cfg.importance, scores=str(run / "score" / stages.SCORES_FILE)))


def target_of(cfg: Config, run: Path) -> Config:
    """The config with `target.*` filled from the search's choice when a search ran."""
    chosen = run / "search" / DONE
    if not cfg.search.target_params or not chosen.is_file():
        return cfg
    shape = json.loads(chosen.read_text())["target"]
    return dataclasses.replace(cfg, target=dataclasses.replace(cfg.target, **shape))


def _correction(cfg: Config, run: Path) -> Config:
    # init=random makes this stage train the teacher from scratch (the seed project's Tiny Shakespeare GPT)
    return dataclasses.replace(cfg, train=cfg.correction, out_dir=str(run / "correction"), resume=True)


def _score(cfg: Config, run: Path) -> Config:
    return dataclasses.replace(cfg, model=teacher_spec(cfg, run), out_dir=str(run / "score"))


def _search(cfg: Config, run: Path) -> Config:
    return dataclasses.replace(_with_scores(cfg, run), model=teacher_spec(cfg, run), out_dir=str(run / "search"))


def _prune(cfg: Config, run: Path) -> Config:
    return dataclasses.replace(_with_scores(target_of(cfg, run), run), model=teacher_spec(cfg, run),
                               out_dir=str(run / "prune"))


def _distill(cfg: Config, run: Path) -> Config:
    cache = cfg.distill.teacher_cache or str(run / "teacher_cache")  # one per run: shared by what distils in it
    return dataclasses.replace(cfg, teacher=teacher_spec(cfg, run), student=str(run / "prune"),
                               out_dir=str(run / "distill"), resume=True, init="pretrained",
                               distill=dataclasses.replace(cfg.distill, teacher_cache=cache))


def _evaluate(cfg: Config, run: Path) -> Config:
    return dataclasses.replace(cfg, teacher=teacher_spec(cfg, run), student=str(run / "prune"),
                               model=str(run / "distill" / "final"), out_dir=str(run / "evaluate"))


def _export(cfg: Config, run: Path) -> Config:
    return dataclasses.replace(cfg, model=str(run / "distill" / "final"),
                               out=str(run / "export" / f"model-{cfg.export.type}.gguf"))


def _report(cfg: Config, run: Path) -> Config:
    return dataclasses.replace(cfg, out_dir=str(run))


def plan_stages(cfg: Config) -> list[Stage]:
    """The stages this config runs, in order."""
    out = []
    if cfg.correction.enabled:
        out.append(Stage("correction", f"fine-tune the teacher {cfg.model} on {cfg.data} (teacher correction)",
                         stages.train, _correction))
    out.append(Stage("score", f"importance of channels, heads, neurons and layers ({cfg.importance.method})",
                     stages.score, _score))
    if cfg.search.target_params:
        out.append(Stage("search", f"search architectures of ~{cfg.search.target_params} parameters",
                         stages.search, _search))
    refit = "" if cfg.prune.reconstruct == "none" else (
        f", refit the projections around the cut ({cfg.prune.reconstruct}, {cfg.prune.reconstruct_inputs} inputs)")
    out.append(Stage("prune", f"cut the teacher to the target{refit}, save a Hugging Face checkpoint",
                     stages.prune, _prune))
    budget = f"{cfg.distill.steps} steps" if cfg.distill.steps else f"{cfg.distill.tokens} tokens"
    out.append(Stage("distill", f"distill from the teacher for {budget}", stages.distill, _distill))
    out.append(Stage("evaluate", "perplexity, KL, agreement and speed: teacher, pruned, distilled",
                     stages.compare, _evaluate))
    if cfg.export.type:
        out.append(Stage("export", f"the distilled model as a {cfg.export.type} GGUF file for llama.cpp",
                         stages.export, _export))
    out.append(Stage("report", "report.md and plots", stages.report, _report))
    return out


def check(cfg: Config) -> None:
    """Checks that need no model: run directory, explicit target or search, data source, model spec."""
    from compactlm.data import BUILTIN_DATA
    from compactlm.inputs import check_out_dir
    from compactlm.models.loading import BUILTINS

    if not cfg.out_dir:
        raise CompactLMError("run needs out_dir=DIR (the run directory)")
    check_out_dir(cfg.out_dir)
    if not cfg.search.target_params and not any(
        getattr(cfg.target, k) is not None for k in
        ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "drop_layers")
    ):
        raise CompactLMError("run needs a target: set target.* keys or search.target_params")
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
        done = " (done)" if (Path(cfg.out_dir) / stage.name / DONE).is_file() else ""
        lines.append(f"{i}. {stage.name}: {stage.what}{done}")
    return lines


def run(cfg: Config) -> dict:
    """Run every stage not yet done, in order; returns each stage's summary."""
    from compactlm.chartok import prepare_tokenizer

    check(cfg)
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = prepare_tokenizer(cfg, run_dir)  # tokenizer=char: built from cfg.data into run_dir/tokenizer
    check_resume(cfg, run_dir / stages.CONFIG_FILE)
    save_config(cfg, run_dir / stages.CONFIG_FILE)
    summary = {}
    for stage in plan_stages(cfg):
        marker = run_dir / stage.name / DONE
        if marker.is_file():
            log.info("stage %s: done, skipping", stage.name)
            summary[stage.name] = json.loads(marker.read_text())
            continue
        log.info("stage %s: %s", stage.name, stage.what)
        start = time.perf_counter()
        result = stage.fn(stage.configure(cfg, run_dir))
        result = {**result, "seconds": round(time.perf_counter() - start, 1)}
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(marker)
        summary[stage.name] = result
    return summary
