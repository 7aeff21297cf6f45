"""Every stage of compactlm as `stage(cfg) -> dict`: the CLI's commands and the steps of `compactlm run`.

    score     importance of channels, heads, neurons and layers      -> scores.safetensors
    search    rank candidate shapes, distill the best briefly, choose -> search.md, search.json
    prune     cut `model` to `target.*`                              -> HF checkpoint, plan.json
    distill   retrain `student` from `teacher` by KD                  -> checkpoint/, best/, final/, metrics.jsonl
    train     cross-entropy training of `model` (teacher correction, baselines, from scratch)
    evaluate  perplexity, parameters, speed; KL/agreement with `teacher` -> eval.json
    export    `model` as one GGUF file `out` for llama.cpp (export.type) -> FILE.gguf
    compare   `teacher`, pruned `student` and distilled `model` side by side (the run's evaluate step)
    report    report.md and plots of the run directory `out_dir`

Each one checks its inputs before any heavy work, writes into `cfg.out_dir` through a staging folder (training
through atomic checkpoints instead), so an interrupted stage leaves no partial output, and writes the resolved
config beside its outputs. Loading helpers live in inputs.py; `pipeline.py` only orders and resumes stages.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from pathlib import Path

from compactlm import data, inputs, provenance
from compactlm.chartok import prepare_tokenizer
from compactlm.config import Config, TrainConfig, check_one_size, check_resume
from compactlm.errors import CompactLMError, read_json
from compactlm.importance.layers import LAYERWISE_METRICS, check_layerwise
from compactlm.inputs import CONFIG_FILE, load, load_splits, scores_for, staged_output
from compactlm.models import layer_shapes
from compactlm.models.family import family_of
from compactlm.models.layerwise import Layerwise
from compactlm.models.loading import load_model, write_checkpoint
from compactlm.models.params import num_params
from compactlm.pruning import depth_metrics_needed, layers_to_drop, make_plan, prune_model, resolve_target
from compactlm.pruning.targets import target_keys

log = logging.getLogger(__name__)

SCORES_FILE = "scores.safetensors"
PLAN_FILE = "plan.json"
EVAL_FILE = "eval.json"


def score(cfg: Config) -> dict:
    """Importance scores of `model` on the calibration split (+ `importance.layer_metrics`)."""
    inputs.check_out_dir(cfg.out_dir)
    layer_shapes.check_uniform(inputs.resolve(cfg.model).config, cfg.model, "scoring")
    model, tokenizer = inputs.load_within(cfg)
    names = cfg.importance.layer_metrics
    if isinstance(model, Layerwise):  # the LM-loss metrics run the whole model once per skipped layer
        skipped = [n for n in names if n not in LAYERWISE_METRICS]
        names = tuple(n for n in names if n in LAYERWISE_METRICS)
        if skipped:
            log.warning("score: layer metrics %s need the whole model in memory (memory_gb): skipped", skipped)
    scores = scores_for(dataclasses.replace(cfg, importance=dataclasses.replace(cfg.importance, scores=None)),
                        model, tokenizer, names)
    with staged_output(cfg.out_dir) as out:
        scores.save(out / SCORES_FILE)
        provenance.write_config(cfg, out / CONFIG_FILE)
    return {"scores": str(Path(cfg.out_dir) / SCORES_FILE), "layer_metrics": sorted(scores.layers), **scores.meta}


def prune(cfg: Config) -> dict:
    """Score (or reuse `importance.scores`), cut `model` to `target.*`, save a plain HF checkpoint + plan.json."""
    inputs.check_out_dir(cfg.out_dir)
    check_one_size(cfg, "prune")
    if cfg.importance.scores and not Path(cfg.importance.scores).is_file():
        raise CompactLMError(f"importance.scores: file {cfg.importance.scores} does not exist")
    record = inputs.resolve(cfg.model)  # config, family and shape, read once for the whole stage
    layer_shapes.check_uniform(record.config, cfg.model, "pruning")
    source = record.dims
    target = resolve_target(cfg.target, source, record.family)  # every shape error before loading any weights
    inputs.check_seq_len(record.config, cfg.calib.seq_len, "calib.seq_len")
    needed = depth_metrics_needed(cfg.target, [source.layers - target.layers])
    scores = inputs.saved_scores(cfg, source)
    # (a mixture of experts' checkpoint stores each expert apart, the model fuses them: it is cut in memory)
    if (scores is not None and all(n in scores.layers for n in needed) and record.local
            and cfg.prune.reconstruct == "none" and cfg.prune.per_layer == "off" and not record.family.moe):
        return _prune_streamed(cfg, record, scores, target)  # nothing to compute: the model never loads
    model, tokenizer = inputs.load_within(cfg)
    for name in needed if scores is None else [n for n in needed if n not in scores.layers]:
        check_layerwise(model, name)  # before the slow passes
    scores = scores_for(cfg, model, tokenizer, needed, saved=scores)  # the file is read once
    if isinstance(model, Layerwise):  # scored one layer at a time: cut tensor by tensor too
        if cfg.prune.per_layer != "off":
            raise CompactLMError("prune.per_layer needs the whole model in memory (memory_gb)")
        if cfg.prune.reconstruct != "none":
            log.warning("prune: prune.reconstruct needs the whole model in memory (memory_gb): skipped")
        return _prune_streamed(cfg, record, scores, target)
    drop = layers_to_drop(cfg.target, source, target.layers, scores)
    per_layer = None
    if cfg.prune.per_layer != "off":
        plan, per_layer = _per_layer(cfg, model, tokenizer, scores, record.family, source, target, drop)
    else:
        plan = make_plan(scores, source, target, drop, cfg.target.expert_metric)
    pruned = prune_model(model, plan)
    if cfg.prune.reconstruct != "none":
        from compactlm.pruning.reconstruct import reconstruct

        reconstruct(model, pruned, plan, inputs.calibration_batches(cfg, tokenizer, model), sites=cfg.prune.reconstruct,
                    inputs=cfg.prune.reconstruct_inputs, ridge=cfg.prune.ridge, progress=True)
    params = {"source": num_params(model), "pruned": num_params(pruned)}
    log.info("pruned %s: %d -> %d parameters", cfg.model, params["source"], params["pruned"])
    with staged_output(cfg.out_dir) as out:
        write_checkpoint(pruned, tokenizer, out)
        _write_plan(cfg, out, plan, scores, source, target, drop, params, per_layer=per_layer)
    return {"out_dir": str(cfg.out_dir), "target_shape": vars(target), "params": params}


def _per_layer(cfg: Config, model, tokenizer, scores, family, source, target, drop: list[int]):
    """(the per-layer plan of prune.per_layer over the layers not in `drop`, at the uniform target's parameters;
    its rule and strength, and each searched strength's calibration loss, for plan.json)."""
    from compactlm.pruning.per_layer import per_layer_plan, search_strength, stream_norms
    from compactlm.pruning.plan import kept_layers

    layers = kept_layers(source.layers, drop)
    strengths = cfg.prune.per_layer_strength
    batches = None
    if cfg.prune.per_layer == "relative" or len(strengths) > 1:
        batches = inputs.calibration_batches(cfg, tokenizer, model)
    streams = stream_norms(model, family, batches) if cfg.prune.per_layer == "relative" else None
    plans = {s: per_layer_plan(model, scores, family, source, target, layers, streams, s) for s in strengths}
    strength, losses = (strengths[0], {}) if len(plans) == 1 else search_strength(model, plans, batches)
    for s, loss in losses.items():
        log.info("prune.per_layer_strength=%g: calibration loss %.4f%s", s, loss, " (kept)" * (s == strength))
    plan = plans[strength]
    widths = [len(plan.ffn[i]) for i in layers.tolist()]
    groups = [len(plan.kv_heads[i]) for i in layers.tolist()]
    log.info("prune.per_layer=%s: MLP widths %d-%d, KV groups %d-%d", cfg.prune.per_layer, min(widths), max(widths),
             min(groups), max(groups))
    return plan, {"rule": cfg.prune.per_layer, "strength": strength,
                  "search": {str(s): loss for s, loss in losses.items()}}


def _prune_streamed(cfg: Config, record: inputs.ModelRecord, scores, target) -> dict:
    """Cut a local safetensors checkpoint to `target` with `scores` (saved, or computed layer by layer) without
    building the model: tensor by tensor into sharded safetensors (pruning/stream.py)."""
    from compactlm.models.loading import load_tokenizer
    from compactlm.models.params import params_of_config
    from compactlm.pruning import prune_config
    from compactlm.pruning.stream import prune_checkpoint

    source, config = record.dims, record.config
    drop = layers_to_drop(cfg.target, source, target.layers, scores)
    plan = make_plan(scores, source, target, drop, cfg.target.expert_metric)
    params = {"source": params_of_config(config), "pruned": params_of_config(prune_config(config, record.family, plan))}
    log.info("pruned %s tensor by tensor: %d -> %d parameters", cfg.model, params["source"], params["pruned"])
    with staged_output(cfg.out_dir) as out:
        prune_checkpoint(cfg.model, plan, out)
        load_tokenizer(cfg.tokenizer or cfg.model).save_pretrained(out)
        _write_plan(cfg, out, plan, scores, source, target, drop, params)
    return {"out_dir": str(cfg.out_dir), "target_shape": vars(target), "params": params}


def _write_plan(cfg: Config, out: Path, plan, scores, source, target, drop: list[int], params: dict,
                per_layer: dict | None = None) -> None:
    """plan.json, the scores used and the resolved config, beside a pruned checkpoint."""
    extra = {"per_layer": per_layer} if per_layer else {}
    plan.save(
        out / PLAN_FILE, source=cfg.model, source_shape=vars(source), target_shape=vars(target),
        dropped_layers=drop, params=params, importance=scores.meta, **extra)
    scores.save(out / SCORES_FILE)
    provenance.write_config(cfg, out / CONFIG_FILE)
    shape = ", ".join(f"{k} {v}" for k, v in vars(target).items() if v)
    provenance.write_model_card(out, cfg, Path(cfg.out_dir).name, f"`{cfg.model}` pruned by compactlm to {shape}: "
                                f"{params['pruned']:,} of its {params['source']:,} parameters, not yet retrained.")


# ---------------------------------------------------------------- training

def distill(cfg: Config) -> dict:
    """Retrain `student` from `teacher` by knowledge distillation (resumable); final metrics."""
    missing = [key for key in ("teacher", "student") if not getattr(cfg, key)]
    if missing:
        raise CompactLMError(f"distill needs {' and '.join(f'{k}=MODEL' for k in missing)}")
    return _fit(cfg, cfg.distill, "distill", cfg.student, cfg.teacher)


def train(cfg: Config) -> dict:
    """Plain cross-entropy training of `model` (init=random: fresh weights), resumable; final metrics."""
    return _fit(cfg, cfg.train, "train", cfg.model, None)


def _check_training_out_dir(cfg: Config, section: str) -> None:
    """An out_dir that holds a checkpoint needs resume=true, and then the config it was started with."""
    from compactlm.distill import checkpoint as ckpt

    found = ckpt.latest(cfg.out_dir)
    if found is not None and not cfg.resume:
        raise CompactLMError(f"out_dir {cfg.out_dir} already holds a training checkpoint (step "
                             f"{ckpt.read_progress(found).step}): pass resume=true to continue it, or choose another out_dir")
    if found is not None:  # what a training depends on: its models, data, seed and its own section
        models = ("teacher", "student") if section == "distill" else ("model",)
        check_resume(cfg, Path(cfg.out_dir) / CONFIG_FILE,
                     only=(*models, "tokenizer", "data", "seed", "dtype", "autocast", "init", "dataset.", f"{section}."))


def _fit(cfg: Config, tc: TrainConfig, section: str, student_spec: str, teacher_spec: str | None) -> dict:
    from compactlm.distill.distributed import setup, teardown
    from compactlm.distill.loop import Session, fit, micro_batch, total_steps
    from compactlm.pruning.plan import read_hidden_keep

    inputs.check_out_dir(cfg.out_dir)
    cfg = prepare_tokenizer(cfg, cfg.out_dir)  # tokenizer=char: built from cfg.data into out_dir/tokenizer
    _check_training_out_dir(cfg, section)
    d = setup(cfg.device)
    try:
        micro = micro_batch(tc, d, section)  # a batch that does not divide fails before any model loads
        student, tokenizer = inputs.load_trainee(cfg, tc, section, student_spec, d.device)
        teacher = None
        if teacher_spec is not None:
            # a teacher to be sharded loads on the CPU: fully_shard moves only this rank's shard to the GPU
            sharded = cfg.distill.teacher_sharded and d.sharded
            teacher = load_model(teacher_spec, dtype=cfg.dtype, device="cpu" if sharded else d.device)
            inputs.check_seq_len(teacher, tc.seq_len, f"{section}.seq_len")
            inputs.same_vocabulary(teacher_spec, teacher, student_spec, student, cfg)
        splits = load_splits(cfg, tokenizer, tc.seq_len, calib=False,
                             train_tokens=total_steps(tc) * tc.batch_size * tc.seq_len, val_rows=tc.eval_sequences)
        val = splits.val[: tc.eval_sequences]
        out = Path(cfg.out_dir)
        if d.is_main:
            out.mkdir(parents=True, exist_ok=True)
            provenance.write_config(cfg, out / CONFIG_FILE)
        log.info("%s: %d train, %d validation rows of %d tokens; %d steps of %d sequences on %d process(es)",
                 section, len(splits.train), len(val), tc.seq_len, total_steps(tc), tc.batch_size, d.world)
        params = num_params(student)
        session = Session(out, d, tokenizer, cfg.seed, cfg.resume, progress=True, **precision(cfg, d))
        keep = read_hidden_keep(student_spec) if teacher is not None else None  # hidden map starts as the plan
        cache = None
        if teacher is not None and getattr(tc, "teacher_top_k", 0):
            cache = _teacher_cache(cfg, tc, teacher, splits.train, micro, d)
        result = fit(student, splits.train, val, tc, session, teacher=teacher, hidden_keep=keep, teacher_cache=cache)
        how = f"distilled from `{teacher_spec}`" if teacher_spec else "trained with cross-entropy"
        for name in ("final", "best") if d.is_main else ():
            if (out / name).is_dir():
                provenance.write_model_card(out / name, cfg, f"{out.name}/{name}", f"`{student_spec}` {how} by "
                                            f"compactlm: {result['steps']} steps, {result['tokens']:,} tokens ({name}).")
    finally:
        teardown(d)
    return {"out_dir": str(out), "params": params, **result}


def precision(cfg: Config, d) -> dict:
    """A training `Session`'s dtypes: param_dtype (dtype=bfloat16: a sharded student gathers and computes in
    bfloat16, reducing its gradients in float32) and autocast (the `autocast` key resolved for d's device)."""
    import torch

    from compactlm.distill.precision import autocast_dtype

    return {"param_dtype": torch.bfloat16 if cfg.dtype == "bfloat16" else None,
            "autocast": autocast_dtype(cfg.autocast, d.device)}


def _teacher_cache(cfg: Config, tc, teacher, train_rows, batch: int, d):
    """Build, or find already built, the teacher's top-K (or sampled) targets of every train row
    (distill.teacher_top_k, distill.teacher_targets)."""
    import torch

    from compactlm.distill.loop import batch_rows, total_steps
    from compactlm.distill.teacher_cache import TeacherCache, cache_key, teacher_fingerprint

    if d.world > 1:
        raise CompactLMError("distill.teacher_top_k runs in one process for now, not under torchrun")

    def logits(ids):  # left on the device: the cache takes the top K there
        with torch.no_grad():
            return teacher(input_ids=ids.to(d.device).long()).logits

    fingerprint = teacher_fingerprint(teacher.config.to_dict(), logits, train_rows[0:1][:, :16])
    key = cache_key(fingerprint, train_rows, cfg.seed, tc.teacher_top_k, tc.temperature, tc.teacher_targets)
    per_shard = 64
    positions = -(-total_steps(tc) * tc.batch_size // per_shard) * per_shard  # the rows the run reads, in whole shards
    cache = TeacherCache(Path(tc.teacher_cache or Path(cfg.out_dir) / "teacher_cache") / key, positions,
                         tc.seq_len, tc.teacher_top_k, rows_per_shard=per_shard, targets=tc.teacher_targets,
                         seed=cfg.seed)
    order = batch_rows(len(train_rows), 0, positions, cfg.seed)  # (positions,) row indices in order of use
    built = cache.build(logits, train_rows, tc.temperature, batch_size=batch, order=order)
    log.info("teacher cache %s: %d rows, %.1f MB on disk (%d bytes per token), %d shards computed now",
             cache.folder, built["rows"], built["bytes"] / 1e6, built["bytes_per_token"], built["built_shards"])
    return cache


# ---------------------------------------------------------------- search

def search(cfg: Config) -> dict:
    """Rank candidate shapes of ~`search.target_params` (and/or `search.target_active_params`) by zero-shot loss,
    distill the best `search.top_k` briefly, choose one; writes search.md and search.json. The chosen shape is the
    result's "target"."""
    from compactlm import arch_search as arch

    if not cfg.search.enabled:
        raise CompactLMError("search needs search.target_params (e.g. 70M, or 0.5 of the teacher) or, for a mixture "
                             "of experts, search.target_active_params")
    check_one_size(cfg, "search")
    inputs.check_out_dir(cfg.out_dir)
    teacher, tokenizer = load(cfg)
    family = family_of(teacher)
    source = family.dims(teacher.config)
    depths = {c.dims.layers for c in arch.enumerate_candidates(teacher, cfg.search)}  # cheap: counts only
    scores = scores_for(cfg, teacher, tokenizer, depth_metrics_needed(cfg.target, [source.layers - n for n in depths]))
    val = _val_batches(cfg, tokenizer, teacher)
    steps = cfg.search.distill_steps * cfg.search.top_k  # the brief distillations' data
    rows = load_splits(cfg, tokenizer, cfg.distill.seq_len, calib=False,
                       train_tokens=steps * cfg.distill.batch_size * cfg.distill.seq_len,
                       val_rows=cfg.distill.eval_sequences)
    chosen, ranked = arch.search(
        teacher, scores, cfg.search, val, layer_metric=cfg.target.layer_metric,
        keep_last_layer=cfg.target.keep_last_layer, expert_metric=cfg.target.expert_metric, progress=True,
        distill_fn=lambda students: _brief_distill(cfg, students, teacher, rows))
    with staged_output(cfg.out_dir) as tmp:
        arch.write_table(ranked, chosen, tmp / "search.md", tmp / "search.json")
        provenance.write_config(cfg, tmp / CONFIG_FILE)
    shape = {key: getattr(chosen.dims, field) for key, field in target_keys(family).items()}
    return {"target": shape, "params": chosen.params, "active_params": chosen.active_params, "candidates": len(ranked)}


def _brief_distill(cfg: Config, students: list, teacher, rows: data.Splits) -> list[float]:
    """Validation losses of `students` after `search.distill_steps` steps of distillation each (trials: nothing
    kept), on the same batches: together from one teacher forward per batch (`search.distill_together`), or one
    after another."""
    from compactlm.distill.distributed import setup
    from compactlm.distill.loop import Session, fit

    tc = dataclasses.replace(cfg.distill, steps=cfg.search.distill_steps, eval_every=None, save_every=None,
                             warmup_steps=1)
    out = Path(cfg.out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.search.", dir=out.parent))  # only metrics.jsonl lands here
    val = rows.val[: tc.eval_sequences]
    try:
        d = setup(cfg.device)
        session = Session(scratch, d, None, cfg.seed, save=False, progress=True, **precision(cfg, d))
        if cfg.search.distill_together:
            results = fit(students, rows.train, val, tc, session, teacher)
        else:
            results = [fit(s, rows.train, val, tc, session, teacher=teacher) for s in students]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return [float(r["val_loss"]) for r in results]


# ---------------------------------------------------------------- evaluation and report

def _val_batches(cfg: Config, tokenizer, model) -> list:
    inputs.check_seq_len(model, cfg.eval.seq_len, "eval.seq_len")
    val = load_splits(cfg, tokenizer, cfg.eval.seq_len, calib=False, val_rows=cfg.eval.sequences).val[: cfg.eval.sequences]
    return list(data.batches(val, cfg.eval.batch_size))


def _measure(cfg: Config, model, tokenizer, batches: list, teacher=None, sample: bool = False,
             teacher_cache: dict | None = None, tasks=None) -> dict:
    """Metrics of one model (+ a greedy sample of `eval.prompt`, + lm-eval `tasks`, from `tasks.load_tasks`)."""
    from compactlm.metrics import evaluate as evaluate_model
    from compactlm.metrics import sample_text

    metrics = evaluate_model(model, batches, teacher=teacher, tokenizer=tokenizer, speed=cfg.eval.speed,
                             progress=True, teacher_cache=teacher_cache, speed_modes=cfg.eval.speed_modes,
                             speed_batches=cfg.eval.speed_batches, speed_tokens=cfg.eval.gen_tokens)
    if sample:
        metrics |= {"dims": layer_shapes.describe(model.config, family_of(model).dims(model.config)),
                    "sample": sample_text(model, tokenizer, cfg.eval.prompt, new_tokens=cfg.eval.gen_tokens)}
    if tasks is not None:
        from compactlm.tasks import run_tasks

        metrics["tasks"] = run_tasks(model, tokenizer, tasks, limit=cfg.eval.task_limit,
                                     device=str(next(model.parameters()).device))
    return metrics


def evaluate(cfg: Config) -> dict:
    """Perplexity, params, speed of `model` on held-out text; KL/agreement against `teacher` when given."""
    from compactlm.tasks import load_tasks

    if cfg.out_dir:
        inputs.check_out_dir(cfg.out_dir)
    tasks = load_tasks(cfg.eval.tasks)  # first: a task that cannot load fails before any model loads
    model, tokenizer = inputs.load_within(cfg, head=True)
    teacher = inputs.load_within(cfg, cfg.teacher, head=True)[0] if cfg.teacher else None
    if cfg.eval.tasks and isinstance(model, Layerwise):
        raise CompactLMError("eval.tasks: lm-eval tasks need the whole model in memory (memory_gb is exceeded)")
    if teacher is not None:
        inputs.same_vocabulary(cfg.teacher, teacher, cfg.model, model, cfg)
    metrics = {"model": cfg.model, **_measure(cfg, model, tokenizer, _val_batches(cfg, tokenizer, model), teacher,
                                              tasks=tasks)}
    if cfg.out_dir:
        with staged_output(cfg.out_dir) as out:
            (out / EVAL_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
            provenance.write_config(cfg, out / CONFIG_FILE)
    return metrics


def compare(cfg: Config) -> dict:
    """`teacher`, the pruned `student` and the distilled `model` on the same held-out text -> eval.json."""
    from compactlm.tasks import load_tasks

    inputs.check_out_dir(cfg.out_dir)
    tasks = load_tasks(cfg.eval.tasks)  # first: a task that cannot load fails before any model loads
    teacher, tokenizer = load(cfg, cfg.teacher)
    batches = _val_batches(cfg, tokenizer, teacher)
    results, cache = {}, {}  # one teacher pass serves both students' KL and agreement
    for name, spec in (("teacher", cfg.teacher), ("pruned", cfg.student), ("distilled", cfg.model)):
        model = teacher if name == "teacher" else load(cfg, spec)[0]
        results[name] = _measure(cfg, model, tokenizer, batches, None if name == "teacher" else teacher,
                                 sample=True, teacher_cache=cache, tasks=tasks)
    with staged_output(cfg.out_dir) as tmp:
        (tmp / EVAL_FILE).write_text(json.dumps(results | {"prompt": cfg.eval.prompt}, indent=1) + "\n")
    return {name: {k: v for k, v in m.items() if k in ("params", "perplexity", "kl")} for name, m in results.items()}


def export(cfg: Config) -> dict:
    """`model` and its tokenizer as a GGUF file `out` (export.type, default f16) that llama.cpp runs."""
    from compactlm.export import export_gguf
    from compactlm.models.loading import load_tokenizer

    if not cfg.out:
        raise CompactLMError("export needs out=FILE.gguf")
    if not cfg.out.endswith(".gguf"):
        raise CompactLMError(f"out={cfg.out}: expected a file name ending in .gguf")
    inputs.check_out_file(cfg.out)
    inputs.resolve(cfg.model)  # a bad spec or an unsupported family fails before the weights load
    model = load_model(cfg.model)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    return export_gguf(model, tokenizer, cfg.out, cfg.export.type or "f16", name=Path(cfg.model).name)


MODELS = ("teacher", "pruned", "distilled")


def report(cfg: Config) -> dict:
    """report.md and PNG plots in the run directory `out_dir`, from what its stages wrote."""
    from compactlm import reporting as rep
    from compactlm.importance.scores import Scores

    run_dir = Path(cfg.out_dir)
    results_file = run_dir / "evaluate" / EVAL_FILE
    if not results_file.is_file() and any(run_dir.glob(f"size-*/evaluate/{EVAL_FILE}")):
        return cascade_report(cfg)  # a cascade's run directory: its sizes live in size-<i>
    if not results_file.is_file():
        raise CompactLMError(f"report: {run_dir} holds no evaluate/{EVAL_FILE} (is it a finished run directory?)")
    results = read_json(results_file)
    prompt = results.pop("prompt", "")
    scores = Scores.load(run_dir / "score" / SCORES_FILE)
    rep.plot_width_importance(scores, run_dir / "importance_width.png")
    rep.plot_layer_importance(scores, run_dir / "importance_layers.png")
    runs = [p for p in (run_dir / "correction" / "metrics.jsonl", run_dir / "distill" / "metrics.jsonl") if p.is_file()]
    rep.plot_training(runs, run_dir / "training.png")
    plots = {"Width importance": "importance_width.png", "Layer importance": "importance_layers.png",
             "Training and validation loss": "training.png"}
    if (run_dir / "search" / "search.json").is_file():
        rep.plot_search(read_json(run_dir / "search" / "search.json")["candidates"], run_dir / "search.png")
        plots["Search candidates"] = "search.png"
    arch = lambda name: results[name]["dims"] | {"params": results[name]["params"]}  # noqa: E731
    exported = run_dir / "export" / "stage.json"  # pipeline.DONE of the export stage
    path = rep.write_report(
        run_dir, teacher=arch("teacher"), student=arch("distilled"),
        stages={name: results[name] for name in MODELS}, plots=plots,
        samples={name: prompt + results[name]["sample"] for name in MODELS},
        notes=[f"config: {run_dir / CONFIG_FILE}", f"distillation metrics: {run_dir / 'distill' / 'metrics.jsonl'}",
               *_compute_note(run_dir / "distill" / "stage.json")],
        exported=read_json(exported) if exported.is_file() else None,
        inputs=provenance.recorded(run_dir / CONFIG_FILE),
    )
    return {"report": str(path)}


def _compute_note(stage_file: Path) -> list[str]:
    """The distillation's compute (`precision.describe`) as the stage recorded it; none for a run before it did."""
    compute = read_json(stage_file).get("compute") if stage_file.is_file() else None
    return [f"distillation computed in {compute} (the autocast key)"] if compute else []


def cascade_report(cfg: Config) -> dict:
    """report.md of a cascade run `out_dir`: every size (RUN/size-<i>) in one table, and their training curves."""
    from compactlm import reporting as rep

    run_dir = Path(cfg.out_dir)
    sizes = {}
    for folder in sorted(run_dir.glob("size-*"), key=lambda p: int(p.name.split("-")[1])):
        results = folder / "evaluate" / EVAL_FILE
        if not results.is_file():
            raise CompactLMError(f"report: {folder} holds no evaluate/{EVAL_FILE} (is the cascade finished?)")
        sizes[folder.name] = read_json(results)
    if not sizes:
        raise CompactLMError(f"report: {run_dir} holds no size-* folders (is it a cascade run directory?)")
    runs = [run_dir / name / "distill" / "metrics.jsonl" for name in sizes]
    rep.plot_training([p for p in runs if p.is_file()], run_dir / "training.png")
    path = rep.write_cascade_report(run_dir, teacher=next(iter(sizes.values()))["teacher"], sizes=sizes,
                                    plots={"Training and validation loss, each size": "training.png"},
                                    inputs=provenance.recorded(run_dir / CONFIG_FILE))
    return {"report": str(path), "sizes": {name: r["distilled"].get("perplexity") for name, r in sizes.items()}}
