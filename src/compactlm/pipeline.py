"""`compactlm run`: the stages in order (teacher correction, score, search or explicit target, prune, distill,
evaluate, GGUF export when export.type is set, report), each in its own folder of the run directory, resumable.
A cascade (size keys given as lists, P1's iterative recipe) makes each size in RUN/size-<i> from the previous
size's distilled model, every size distilled from the teacher, and ends with one report of all sizes.

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

from compactlm import provenance, stages
from compactlm.config import Config, cascade_length, cascade_step, check_resume
from compactlm.errors import CompactLMError, read_json

log = logging.getLogger(__name__)

DONE = "stage.json"


@dataclasses.dataclass(frozen=True)
class Step:
    """One size of the run: where its stages live and what they start from."""

    dir: Path  # the run directory, or RUN/size-<i> in a cascade
    source: str  # the model scored and pruned: the teacher, or the previous size's distilled model
    teacher: str  # the model distilled from and compared against: the run's teacher at every size
    run: Path  # the run directory (its teacher cache is shared by every size)


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    what: str
    fn: Callable[[Config], dict]  # a stage of stages.py
    configure: Callable[[Config, Step], Config]  # (run or size config, where it runs) -> this stage's config


def teacher_spec(cfg: Config, run: Path) -> str:
    """The teacher used for scoring and distillation: the corrected one when correction is enabled."""
    return str(run / "correction" / "final") if cfg.correction.enabled else cfg.model


def _with_scores(cfg: Config, step: Step) -> Config:
    return dataclasses.replace(cfg, importance=dataclasses.replace(
        cfg.importance, scores=str(step.dir / "score" / stages.SCORES_FILE)))


def target_of(cfg: Config, step_dir: Path) -> Config:
    """The config with `target.*` filled from the search's choice when a search ran."""
    chosen = step_dir / "search" / DONE
    if not cfg.search.enabled or not chosen.is_file():
        return cfg
    shape = read_json(chosen)["target"]
    return dataclasses.replace(cfg, target=dataclasses.replace(cfg.target, **shape))


def _correction(cfg: Config, step: Step) -> Config:
    # init=random makes this stage train the teacher from scratch (the seed project's Tiny Shakespeare GPT)
    return dataclasses.replace(cfg, train=cfg.correction, out_dir=str(step.run / "correction"), resume=True)


def _score(cfg: Config, step: Step) -> Config:
    return dataclasses.replace(cfg, model=step.source, out_dir=str(step.dir / "score"))


def _search(cfg: Config, step: Step) -> Config:
    return dataclasses.replace(_with_scores(cfg, step), model=step.source, out_dir=str(step.dir / "search"))


def _prune(cfg: Config, step: Step) -> Config:
    return dataclasses.replace(_with_scores(target_of(cfg, step.dir), step), model=step.source,
                               out_dir=str(step.dir / "prune"))


def _distill(cfg: Config, step: Step) -> Config:
    cache = cfg.distill.teacher_cache or str(step.run / "teacher_cache")  # one per run: shared by what distils in it
    return dataclasses.replace(cfg, teacher=step.teacher, student=str(step.dir / "prune"),
                               out_dir=str(step.dir / "distill"), resume=True, init="pretrained",
                               distill=dataclasses.replace(cfg.distill, teacher_cache=cache))


def _evaluate(cfg: Config, step: Step) -> Config:
    return dataclasses.replace(cfg, teacher=step.teacher, student=str(step.dir / "prune"),
                               model=str(step.dir / "distill" / "final"), out_dir=str(step.dir / "evaluate"))


def _export(cfg: Config, step: Step) -> Config:
    return dataclasses.replace(cfg, model=str(step.dir / "distill" / "final"),
                               out=str(step.dir / "export" / f"model-{cfg.export.type}.gguf"))


def _report(cfg: Config, step: Step) -> Config:
    return dataclasses.replace(cfg, out_dir=str(step.dir))


def _cascade_report(cfg: Config, step: Step) -> Config:
    return dataclasses.replace(cfg, out_dir=str(step.run))


def plan_stages(cfg: Config) -> list[Stage]:
    """The stages that make one size, in order (correction, once per run, not included)."""
    out = [Stage("score", f"importance of channels, heads, neurons and layers ({cfg.importance.method})",
                 stages.score, _score)]
    if cfg.search.enabled:
        budget = " and ".join(f"~{value} {what}" for what, value in (
            ("parameters", cfg.search.target_params), ("active parameters", cfg.search.target_active_params))
            if value is not None)
        out.append(Stage("search", f"search architectures of {budget}",
                         stages.search, _search))
    refit = "" if cfg.prune.reconstruct == "none" else (
        f", refit the projections around the cut ({cfg.prune.reconstruct}, {cfg.prune.reconstruct_inputs} inputs)")
    out.append(Stage("prune", f"cut the model to the target{refit}, save a Hugging Face checkpoint",
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


CASCADE_REPORT = Stage("report", "report.md: every size of the cascade", stages.cascade_report, _cascade_report)


def _teacher_sizes(spec: str) -> dict[str, int]:
    """The teacher's sizes under config.CASCADE_KEYS, from its config alone (no weights)."""
    from compactlm.models.family import family_of
    from compactlm.models.loading import load_model_config
    from compactlm.models.params import params_of_config
    from compactlm.pruning.targets import target_keys

    config = load_model_config(spec)
    family = family_of(config)
    d = family.dims(config)
    return {f"target.{key}": getattr(d, field) for key, field in target_keys(family).items()} | {
        "search.target_params": params_of_config(config), "search.target_active_params": params_of_config(config, active=True)}


def plan(cfg: Config, resolve: bool = True) -> list[tuple[Stage, Config, Step]]:
    """Every stage of the run with the config it runs under and where: correction (when enabled) once, then the
    stages of each size; in a cascade (list-valued sizes) each size in RUN/size-<i>, pruned from the previous
    size's distilled model, distilled from the teacher, then one report. `resolve=False` (a dry run) leaves a
    cascade's fractions as given instead of reading the teacher's config."""
    run = Path(cfg.out_dir)
    teacher = teacher_spec(cfg, run)
    correction = Stage("correction", f"fine-tune the teacher {cfg.model} on {cfg.data} (teacher correction)",
                       stages.train, _correction)
    out = [(correction, cfg, Step(run, cfg.model, cfg.model, run))] if cfg.correction.enabled else []
    n = cascade_length(cfg)
    if n == 1:
        return out + [(stage, cfg, Step(run, teacher, teacher, run)) for stage in plan_stages(cfg)]
    sizes = _teacher_sizes(cfg.model) if resolve else None  # a corrected teacher keeps the teacher's shape
    source = teacher
    for i in range(n):
        size_cfg = cascade_step(cfg, i, sizes) if sizes else cfg
        step = Step(run / f"size-{i + 1}", source, teacher, run)
        out += [(stage, size_cfg, step) for stage in plan_stages(size_cfg)]
        source = str(step.dir / "distill" / "final")
    return out + [(CASCADE_REPORT, cfg, Step(run, teacher, teacher, run))]


def _marker(stage: Stage, step: Step) -> Path:
    return (step.run if stage.fn is stages.train else step.dir) / stage.name / DONE


def check(cfg: Config) -> None:
    """Checks that need no model: run directory, explicit target or search, data source, model spec."""
    from compactlm.data import BUILTIN_DATA
    from compactlm.inputs import check_out_dir
    from compactlm.models.loading import BUILTINS

    if not cfg.out_dir:
        raise CompactLMError("run needs out_dir=DIR (the run directory)")
    check_out_dir(cfg.out_dir)
    cascade_length(cfg)  # list-valued sizes agree in length
    from compactlm.pruning.targets import MOE_KEYS, TARGET_KEYS

    if not cfg.search.enabled and not any(
            getattr(cfg.target, k) is not None for k in (*TARGET_KEYS, *MOE_KEYS, "drop_layers")):
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
    for i, (stage, _, step) in enumerate(plan(cfg, resolve=False), 1):
        done = " (done)" if _marker(stage, step).is_file() else ""
        where = f"{step.dir.name}/" if step.dir != step.run and stage is not CASCADE_REPORT else ""
        lines.append(f"{i}. {where}{stage.name}: {stage.what}{done}")
    return lines


def run(cfg: Config) -> dict:
    """Run every stage not yet done, in order; returns each stage's summary."""
    from compactlm.chartok import prepare_tokenizer

    check(cfg)
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = prepare_tokenizer(cfg, run_dir)  # tokenizer=char: built from cfg.data into run_dir/tokenizer
    check_resume(cfg, run_dir / stages.CONFIG_FILE)
    provenance.write_config(cfg, run_dir / stages.CONFIG_FILE)
    summary = {}
    for stage, stage_cfg, step in plan(cfg):
        marker = _marker(stage, step)
        name = str(marker.parent.relative_to(run_dir))  # "prune", or "size-2/prune" in a cascade
        if marker.is_file():
            log.info("stage %s: done, skipping", name)
            summary[name] = read_json(marker)
            continue
        log.info("stage %s: %s", name, stage.what)
        start = time.perf_counter()
        result = stage.fn(stage.configure(stage_cfg, step))
        result = {**result, "seconds": round(time.perf_counter() - start, 1)}
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(marker)
        summary[name] = result
    return summary
