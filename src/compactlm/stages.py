"""The pipeline's stages as functions of a resolved `Config`: score, prune, evaluate.

Each stage validates its inputs before any heavy work, writes into `cfg.out_dir` through a staging
directory (so a failure leaves no partial output), and writes the resolved config beside its outputs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from compactlm import data
from compactlm.config import Config, save_config
from compactlm.errors import CompactLMError
from compactlm.importance.scores import Scores
from compactlm.models.family import family_of
from compactlm.models.loading import load_model, load_model_config, load_tokenizer, num_params, write_checkpoint
from compactlm.pruning import depth_metrics_needed, layers_to_drop, make_plan, prune_model, resolve_target

log = logging.getLogger(__name__)

SCORES_FILE = "scores.safetensors"
PLAN_FILE = "plan.json"
CONFIG_FILE = "compactlm.yaml"


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextlib.contextmanager
def staged_output(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temp dir beside `out_dir`; on success move its entries into `out_dir`, on failure delete it."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging.", dir=out.parent))
    try:
        yield tmp
        out.mkdir(exist_ok=True)
        for entry in tmp.iterdir():
            target = out / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            entry.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_seq_len(model_or_config, seq_len: int, key: str) -> None:
    """A sequence length above the model's maximum position is an error naming the key."""
    config = getattr(model_or_config, "config", model_or_config)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and seq_len > limit:
        raise CompactLMError(f"{key}={seq_len} exceeds the model's maximum sequence length {limit}")


def load_splits(cfg: Config, tokenizer, seq_len: int, calib: bool = True) -> data.Splits:
    """Tokenised, packed calibration (unless `calib` is False)/train/validation splits of `cfg.data`."""
    texts = data.load_texts(
        cfg.data, text_field=cfg.dataset.text_field, split=cfg.dataset.split, max_chars=cfg.dataset.max_chars
    )
    return data.make_splits(
        texts, tokenizer, seq_len, val_fraction=cfg.dataset.val_fraction,
        calib_sequences=cfg.calib.sequences if calib else 0, seed=cfg.seed,
    )


def load(cfg: Config, spec: str | None = None):
    """(model, tokenizer) for `spec` (default cfg.model) on the configured device and dtype."""
    spec = spec or cfg.model
    model = load_model(spec, dtype=cfg.dtype, device=pick_device(cfg.device))
    return model, load_tokenizer(cfg.tokenizer or spec)


def calibration_batches(cfg: Config, tokenizer, model) -> list[dict[str, torch.Tensor]]:
    """The calibration split as a list of batches."""
    check_seq_len(model, cfg.calib.seq_len, "calib.seq_len")
    splits = load_splits(cfg, tokenizer, cfg.calib.seq_len)
    return list(data.batches(splits.calib, cfg.calib.batch_size))


def compute_scores(cfg: Config, model, batches: list, layer_metrics: tuple[str, ...]) -> Scores:
    """Width importance on all calibration batches; depth metrics on the first `calib.layer_sequences` rows."""
    from compactlm.importance import score as score_model

    imp = cfg.importance
    scores = score_model(
        model, batches, method=imp.method, aggregation=imp.aggregation, head_score=imp.head_score,
        layer_metrics=(), seed=cfg.seed, progress=True,
    )
    scores = Scores(scores.hidden, scores.heads, scores.ffn, scores.layers, scores.meta | {"model": cfg.model})
    return add_layer_metrics(cfg, model, batches, scores, layer_metrics)


def add_layer_metrics(cfg: Config, model, batches: list, scores: Scores, names: tuple[str, ...]) -> Scores:
    """Scores with the named depth metrics added, computed on the first `calib.layer_sequences` rows."""
    from compactlm.importance.layers import with_depth_metrics

    if all(n in scores.layers for n in names):
        return scores
    rows = torch.cat([b["input_ids"] for b in batches])[: cfg.calib.layer_sequences]  # (N, S), packed: no padding
    return with_depth_metrics(model, data.batches(rows, cfg.calib.batch_size), scores, names)


def score(cfg: Config) -> Scores:
    """`compactlm score`: compute and save importance scores to out_dir/scores.safetensors."""
    model, tokenizer = load(cfg)
    scores = compute_scores(cfg, model, calibration_batches(cfg, tokenizer, model), cfg.importance.layer_metrics)
    with staged_output(cfg.out_dir) as out:
        scores.save(out / SCORES_FILE)
        save_config(cfg, out / CONFIG_FILE)
    return scores


def scores_for(cfg: Config, model, tokenizer, needed: tuple[str, ...]) -> Scores:
    """Saved scores when `importance.scores` is given (checked against the model's shape), else fresh ones;
    then every depth metric in `needed` that they lack, computed on the calibration rows."""
    batches: list | None = None
    if cfg.importance.scores:
        scores = Scores.load(cfg.importance.scores)
        scores.check(family_of(model).dims(model.config), f"importance.scores: {cfg.importance.scores}")
    else:
        batches = calibration_batches(cfg, tokenizer, model)
        scores = compute_scores(cfg, model, batches, ())
    if any(n not in scores.layers for n in needed):
        scores = add_layer_metrics(cfg, model, batches or calibration_batches(cfg, tokenizer, model), scores, needed)
    return scores


def prune(cfg: Config) -> Path:
    """`compactlm prune`: score (or reuse scores), cut to `cfg.target`, save a plain HF checkpoint + plan.json."""
    if cfg.importance.scores and not Path(cfg.importance.scores).is_file():
        raise CompactLMError(f"importance.scores: file {cfg.importance.scores} does not exist")
    config = load_model_config(cfg.model)
    family = family_of(config)
    source = family.dims(config)
    target = resolve_target(cfg.target, source, family)  # every shape error before loading any weights
    check_seq_len(config, cfg.calib.seq_len, "calib.seq_len")
    model, tokenizer = load(cfg)
    scores = scores_for(cfg, model, tokenizer, depth_metrics_needed(cfg.target, [source.layers - target.layers]))
    drop = layers_to_drop(cfg.target, source, target.layers, scores)
    plan = make_plan(scores, source, target, drop)
    pruned = prune_model(model, plan)
    log.info("pruned %s: %d -> %d parameters", cfg.model, num_params(model), num_params(pruned))
    with staged_output(cfg.out_dir) as out:
        write_checkpoint(pruned, tokenizer, out)
        plan.save(
            out / PLAN_FILE, source=cfg.model, source_shape=vars(source), target_shape=vars(target),
            dropped_layers=drop, params={"source": num_params(model), "pruned": num_params(pruned)},
            importance=scores.meta,
        )
        scores.save(out / SCORES_FILE)
        save_config(cfg, out / CONFIG_FILE)
    return Path(cfg.out_dir)


def task_metrics(cfg: Config, model, tokenizer) -> dict:
    """Downstream `eval.tasks` through lm-evaluation-harness (an optional extra): {task: {metric: value}}."""
    from compactlm.tasks import run_tasks

    return run_tasks(model, tokenizer, cfg.eval.tasks, limit=cfg.eval.task_limit,
                     device=str(next(model.parameters()).device))


def evaluate(cfg: Config) -> dict:
    """`compactlm eval`: perplexity, params, speed, and KL/agreement against `cfg.teacher` when given."""
    from compactlm.evaluate import evaluate as evaluate_model

    model, tokenizer = load(cfg)
    teacher = load(cfg, cfg.teacher)[0] if cfg.teacher else None
    check_seq_len(model, cfg.eval.seq_len, "eval.seq_len")
    splits = load_splits(cfg, tokenizer, cfg.eval.seq_len)
    val = splits.val[: cfg.eval.sequences]
    metrics = evaluate_model(
        model, list(data.batches(val, cfg.eval.batch_size)), teacher=teacher, tokenizer=tokenizer,
        speed=cfg.eval.speed, progress=True,
    )
    if cfg.eval.tasks:
        metrics["tasks"] = task_metrics(cfg, model, tokenizer)
    metrics = {"model": cfg.model, **metrics}
    if cfg.out_dir:
        with staged_output(cfg.out_dir) as out:
            (out / "eval.json").write_text(json.dumps(metrics, indent=1) + "\n")
            save_config(cfg, out / CONFIG_FILE)
    return metrics
