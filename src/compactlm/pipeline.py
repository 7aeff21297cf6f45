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

    return run_train(dataclasses.replace(cfg, train=cfg.correction, out_dir=str(out), resume=True, init="pretrained"))


def _score(cfg: Config, out: Path) -> dict:
    from compactlm import stages

    scores = stages.score(dataclasses.replace(cfg, model=teacher_spec(cfg), out_dir=str(out)))
    return {"scores": str(out / stages.SCORES_FILE), "layer_metrics": sorted(scores.layers)}


def _search(cfg: Config, out: Path) -> dict:
    from compactlm.search_stage import run_search

    return run_search(dataclasses.replace(cfg, model=teacher_spec(cfg)), out, _run_dir(cfg) / "score" / "scores.safetensors")


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
    return run_distill(dataclasses.replace(cfg, teacher=teacher_spec(cfg), student=student, out_dir=str(out), resume=True))


def _evaluate(cfg: Config, out: Path) -> dict:
    from compactlm.report_stage import evaluate_all

    return evaluate_all(cfg, teacher_spec(cfg), _run_dir(cfg), out)


def _report(cfg: Config, out: Path) -> dict:
    from compactlm.report_stage import build_report

    return {"report": str(build_report(cfg, _run_dir(cfg), out))}


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
    """Checks that need no model: explicit target or search, data source, model spec."""
    from compactlm.models.loading import BUILTINS

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
    if data != "python-docs" and (data.startswith((".", "/", "~")) or Path(data).suffix) and not Path(data).exists():
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
    check(cfg)
    run_dir = _run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
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
