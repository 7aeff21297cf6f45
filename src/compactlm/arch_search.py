"""Architecture search (Minitron, P1: arXiv 2407.14679): enumerate shapes near a parameter target, prune each, rank them.

Grids come from `SearchConfig` or are derived from the teacher. Every candidate is pruned from the same saved
importance scores and scored by its zero-shot validation loss; when the caller supplies `distill_fn`, the best
`top_k` are distilled briefly and the lowest distilled loss wins (P1), else the lowest zero-shot loss wins.
The budget is `search.target_params` (all parameters), `search.target_active_params` (a mixture of experts:
the parameters one token runs through, its top-k experts out of all of them), or both.

Derived grids (a key left as None):
- layers:   about six values from the teacher's L down to ceil(L / 2)
- kv_heads: the teacher's (families without GQA, e.g. GPT-2, keep kv_heads == heads)
- heads:    multiples of each kv_heads up to the teacher's heads (any count for families without GQA)
- hidden:   multiples of the divisor from a quarter of the teacher's hidden up to it, plus the teacher's
- ffn:      {2, 2.5, 3, 3.5, 4, teacher's ffn/hidden} x hidden rounded to the divisor, <= the teacher's, plus
            the teacher's ffn; a mixture of experts: {1, 3/4, 1/2} x the teacher's expert width
- experts:  a mixture of experts: {1, 3/4, 1/2, 1/4} x the teacher's experts, never fewer than its top-k
The divisor is `search.divisor`, or a quarter of the teacher's size where that is smaller (tiny models).

Latency: with `search.max_latency_ms` set, `search` times every enumerated candidate (a random model of its
shape, one sequence, on the teacher's device), drops the slower ones, and raises a one-line error naming
`search.max_latency_ms` when none is fast enough. Without it, latency is not measured (shown as "-").
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import itertools
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from compactlm.config import SearchConfig, TargetConfig
from compactlm.errors import CompactLMError
from compactlm.metrics import perplexity
from compactlm.importance.scores import Scores
from compactlm.models.family import Dims, Family, family_of
from compactlm.models.params import named_shapes, num_params, param_count
from compactlm.pruning import layers_to_drop, make_plan, prune_model

log = logging.getLogger(__name__)

FFN_FACTORS = (2.0, 2.5, 3.0, 3.5, 4.0)  # MLP width as a multiple of hidden (P1 used 2.5-4)
EXPERT_FRACTIONS = (1.0, 0.75, 0.5, 0.25)  # derived expert grids: these shares of the teacher's experts
LAYER_VALUES = 6  # derived layer grid: this many values from L down to L/2

Shapes = Mapping[str, tuple[int, ...]]  # parameter name -> shape (models/params.py: named_shapes)


@dataclass(frozen=True)
class Candidate:
    """One shape of the search and what was measured for it."""

    dims: Dims
    params: int
    latency_ms: float | None = None  # one forward of one sequence
    zero_shot_loss: float | None = None  # validation loss (nats/token) right after pruning
    distilled_loss: float | None = None  # validation loss after the brief distillation
    rank: int | None = None  # 1 = chosen; distilled candidates rank ahead of the rest
    active_params: int | None = None  # a mixture of experts: parameters a token runs through

    def to_json(self) -> dict:
        """Plain values, dims as a nested mapping."""
        return dataclasses.asdict(self)


def _target_params(value: int | float, teacher_params: int) -> int:
    """search.target_params or target_active_params as an absolute count (a float in (0, 1] is a fraction of the
    teacher's)."""
    if isinstance(value, float):  # SearchConfig has checked it lies in (0, 1]
        return round(teacher_params * value)
    return value


def _budgets(model, family: Family, shapes: Shapes, cfg: SearchConfig) -> dict[str, int]:
    """Candidate field ("params", "active_params") -> its absolute target, for each budget the config sets."""
    if cfg.target_active_params is not None and not family.moe:
        raise CompactLMError(f"search.target_active_params: {family.name} is dense (every parameter is active); "
                             "set search.target_params")
    if not cfg.enabled:
        raise CompactLMError("search.target_params is not set (an absolute count such as 70M, or a fraction)")
    budgets = {}
    if cfg.target_params is not None:
        budgets["params"] = _target_params(cfg.target_params, num_params(model))
    if cfg.target_active_params is not None:
        teacher_active = param_count(shapes, family, family.dims(model.config), active=True)
        budgets["active_params"] = _target_params(cfg.target_active_params, teacher_active)
    return budgets


def _divisor(divisor: int, size: int) -> int:
    """The grid step: `divisor`, or a quarter of `size` when that is smaller (tiny models)."""
    return max(1, min(divisor, size // 4))


def _layer_grid(layers: int) -> list[int]:
    low = math.ceil(layers / 2)
    n = min(LAYER_VALUES, layers - low + 1)
    if n <= 1:
        return [layers]
    return sorted({round(layers - i * (layers - low) / (n - 1)) for i in range(n)})


def _hidden_grid(hidden: int, divisor: int) -> list[int]:
    step = _divisor(divisor, hidden)
    start = max(step, math.ceil(hidden / 4 / step) * step)
    return sorted(set(range(start, hidden + 1, step)) | {hidden})


def _ffn_grid(hidden: int, source: Dims, divisor: int) -> list[int]:
    step = _divisor(divisor, source.ffn)
    if source.experts:  # experts are narrow (a fraction of hidden): fractions of the teacher's width
        sizes = {max(step, round(f * source.ffn / step) * step) for f in EXPERT_FRACTIONS[:3]}
    else:
        factors = (*FFN_FACTORS, source.ffn / source.hidden)
        sizes = {max(step, round(f * hidden / step) * step) for f in factors}
    return sorted({s for s in sizes if s <= source.ffn} | {source.ffn})


def _expert_grid(source: Dims) -> list[int]:
    return sorted({max(source.top_k, round(f * source.experts)) for f in EXPERT_FRACTIONS}) if source.experts else [0]


def _head_options(source: Dims, family: Family, cfg: SearchConfig) -> list[tuple[int, int]]:
    """(heads, kv_heads) pairs from the grids; families without GQA keep kv_heads == heads."""
    if "kv_heads" not in family.keys:
        if cfg.kv_heads is not None:
            raise CompactLMError(f"search.kv_heads: {family.name} has no grouped-query attention")
        return [(h, h) for h in (cfg.heads or range(1, source.heads + 1))]
    kv_grid = cfg.kv_heads or (source.kv_heads,)
    heads_grid = cfg.heads or sorted({m for kv in kv_grid for m in range(kv, source.heads + 1, kv)})
    return [(h, kv) for h in heads_grid for kv in kv_grid]


def _fits(dims: Dims, source: Dims, family: Family) -> bool:
    """The config class accepts `dims` and the teacher can be cut down to it."""
    try:
        family.check(dims)
    except CompactLMError:
        return False
    fields = ("hidden", "ffn", "heads", "kv_heads", "layers", "experts")
    inside = all(getattr(dims, f) <= getattr(source, f) for f in fields)
    return inside and dims.groups <= source.groups


def _shapes(source: Dims, family: Family, cfg: SearchConfig) -> list[Dims]:
    """Every grid shape the family accepts and the teacher contains."""
    out = []
    layer_grid = cfg.layers or _layer_grid(source.layers)
    hidden_grid = cfg.hidden or _hidden_grid(source.hidden, cfg.divisor)
    head_options = _head_options(source, family, cfg)
    if cfg.experts is not None and not family.moe:
        raise CompactLMError(f"search.experts: {family.name} has no experts")
    expert_grid = cfg.experts or _expert_grid(source)
    for layers, (heads, kv), hidden, experts in itertools.product(layer_grid, head_options, hidden_grid, expert_grid):
        for ffn in cfg.ffn or _ffn_grid(hidden, source, cfg.divisor):
            dims = Dims(hidden, ffn, heads, kv, source.head_dim, layers, source.vocab, experts, source.top_k)
            if _fits(dims, source, family):
                out.append(dims)
    return out


def enumerate_candidates(model, cfg: SearchConfig) -> list[Candidate]:
    """Shapes within +-tolerance of every budget set (`_budgets`), closest first, at most `max_candidates`."""
    family = family_of(model)
    source = family.dims(model.config)
    shapes = named_shapes(model)
    budgets = _budgets(model, family, shapes, cfg)
    active = lambda d: param_count(shapes, family, d, active=True) if family.moe else None  # noqa: E731
    fits = [Candidate(d, param_count(shapes, family, d), active_params=active(d)) for d in _shapes(source, family, cfg)]
    if not fits:
        raise CompactLMError(f"search grids hold no shape that {family.name} accepts inside the teacher")
    miss = lambda c: max(abs(getattr(c, k) - n) / n for k, n in budgets.items())  # noqa: E731
    fits.sort(key=lambda c: (miss(c), -c.dims.layers, -c.dims.hidden, -c.dims.heads, -c.dims.ffn, -c.dims.experts))
    within = [c for c in fits if miss(c) <= cfg.tolerance]
    wanted = " and ".join(f"search.target_{k}={getattr(cfg, 'target_' + k)} ({n:,})" for k, n in budgets.items())
    if not within:
        c, d = fits[0], fits[0].dims
        active_text = f", {c.active_params:,} active" if c.active_params is not None else ""
        experts_text = f" experts={d.experts}" if d.experts else ""
        raise CompactLMError(
            f"{wanted}: no candidate within +-{cfg.tolerance:.0%}; the closest has {c.params:,} parameters"
            f"{active_text} (layers={d.layers} hidden={d.hidden} heads={d.heads} kv_heads={d.kv_heads} ffn={d.ffn}"
            f"{experts_text})"
        )
    log.info("search: %d shapes fit, %d within +-%.0f%% of %s", len(fits), len(within), 100 * cfg.tolerance, wanted)
    return within[: cfg.max_candidates]


def _config_for(model_config, family: Family, dims: Dims):
    """A copy of the teacher's config describing `dims` (per-layer attention kinds truncated to fit)."""
    config = copy.deepcopy(model_config)
    for key, value in family.config_updates(dims).items():
        setattr(config, key, value)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[: dims.layers]
    return config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    """Free a deleted model: refcounting suffices on CPU; on CUDA also collect and empty the cache."""
    if device.type == "cuda":
        gc.collect()  # ~0.5 s with transformers loaded: worth it only where the cache is handed back
        torch.cuda.empty_cache()


def measure_latency(model_config, dims: Dims, family: Family, device: str | torch.device, seq_len: int = 128,
                    repeats: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """Median ms of one no-grad forward of a (1, seq_len) sequence through a random model of shape `dims`."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    config = _config_for(model_config, family, dims)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    seq_len = min(seq_len, limit) if limit else seq_len
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    ids = torch.randint(0, dims.vocab, (1, seq_len), device=device)  # (1, S)
    times = []
    try:
        with torch.inference_mode():
            for _ in range(max(1, repeats) + 1):  # the first forward is a warm-up
                _sync(device)
                start = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                _sync(device)
                times.append(1000.0 * (time.perf_counter() - start))
    finally:
        del model
        _free(device)
    return statistics.median(times[1:])


def _within_latency(teacher, family: Family, candidates: list[Candidate], limit_ms: float) -> list[Candidate]:
    """Candidates with their latency measured, the slower than `limit_ms` dropped."""
    param = next(teacher.parameters())
    timed = [dataclasses.replace(c, latency_ms=measure_latency(teacher.config, c.dims, family, param.device,
                                                               dtype=param.dtype)) for c in candidates]
    fast = [c for c in timed if c.latency_ms <= limit_ms]
    if not fast:
        raise CompactLMError(
            f"search.max_latency_ms={limit_ms}: no candidate is fast enough (the fastest takes "
            f"{min(c.latency_ms for c in timed):.2f} ms)"
        )
    log.info("search: %d of %d candidates within %.2f ms", len(fast), len(timed), limit_ms)
    return fast


def _loss_key(loss: float | None) -> float:
    return loss if loss is not None and math.isfinite(loss) else math.inf


def search(teacher, scores: Scores, cfg: SearchConfig, val_batches: list, *,
           layer_metric: str = "block_importance", keep_last_layer: bool = True, expert_metric: str = "reap_sum",
           distill_fn: Callable[[list[torch.nn.Module]], list[float]] | None = None,
           progress: bool = False) -> tuple[Candidate, list[Candidate]]:
    """(chosen, every candidate ranked); `distill_fn(students) -> their val losses` briefly distills the best
    top_k (given all at once, so that they can share the teacher's forward passes)."""
    family = family_of(teacher)
    source = family.dims(teacher.config)
    device = next(teacher.parameters()).device
    scores.check(source, "search: the importance scores")
    candidates = enumerate_candidates(teacher, cfg)
    # every depth choice before any pruning, so a missing layer metric fails fast
    depth = TargetConfig(layer_metric=layer_metric, keep_last_layer=keep_last_layer)
    drops = {n: layers_to_drop(depth, source, n, scores) for n in {c.dims.layers for c in candidates}}
    if cfg.max_latency_ms is not None:
        candidates = _within_latency(teacher, family, candidates, cfg.max_latency_ms)

    def pruned(cand: Candidate):
        return prune_model(teacher, make_plan(scores, source, cand.dims, drops[cand.dims.layers], expert_metric))

    scored = []
    for cand in tqdm(candidates, desc="search: zero-shot", disable=not progress):
        student = pruned(cand)
        loss = perplexity(student, val_batches)["loss"]
        del student
        _free(device)
        scored.append(dataclasses.replace(cand, zero_shot_loss=loss))
        log.info("search: %s params=%d zero-shot loss %.4f", cand.dims, cand.params, loss)
    ordered = sorted(scored, key=lambda c: _loss_key(c.zero_shot_loss))
    if distill_fn is not None and cfg.top_k > 0:
        best = ordered[: cfg.top_k]
        losses = [float(x) for x in distill_fn([pruned(c) for c in best])]
        _free(device)
        distilled = [dataclasses.replace(c, distilled_loss=loss) for c, loss in zip(best, losses)]
        for c in distilled:
            log.info("search: %s distilled loss %.4f", c.dims, c.distilled_loss)
        ordered = sorted(distilled, key=lambda c: _loss_key(c.distilled_loss)) + ordered[cfg.top_k:]
    ranked = [dataclasses.replace(c, rank=i + 1) for i, c in enumerate(ordered)]
    return ranked[0], ranked


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def write_table(candidates: list[Candidate], chosen: Candidate, path_md: Path, path_json: Path) -> None:
    """search.md (one row per candidate, the chosen one marked) and search.json."""
    moe = chosen.dims.experts > 0
    header = ("rank", "layers", "hidden", "heads", "kv_heads", "ffn", *(("experts",) if moe else ()), "params",
              *(("active params",) if moe else ()), "latency (ms)", "zero-shot loss", "distilled loss", "chosen")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in candidates:
        d = c.dims
        row = (c.rank, d.layers, d.hidden, d.heads, d.kv_heads, d.ffn, *((d.experts,) if moe else ()), c.params,
               *((c.active_params,) if moe else ()), c.latency_ms, c.zero_shot_loss, c.distilled_loss,
               "**yes**" if c.dims == chosen.dims else "")
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    Path(path_md).write_text("\n".join(lines) + "\n")
    data = {"chosen": chosen.to_json(), "candidates": [c.to_json() for c in candidates]}
    Path(path_json).write_text(json.dumps(data, indent=1) + "\n")
