"""What a run may do with a config: cascades (list-valued sizes, one per size) and resuming (which keys may change
between a run and its resume)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from compactlm.config.loading import read_yaml, to_dict
from compactlm.config.schema import Config
from compactlm.errors import CompactLMError


CASCADE_KEYS = ("target.hidden_size", "target.intermediate_size", "target.num_attention_heads",
                "target.num_key_value_heads", "target.num_hidden_layers", "target.num_experts",
                "target.num_local_experts", "target.moe_intermediate_size", "search.target_params",
                "search.target_active_params")


def _get(cfg: Any, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def cascade_length(cfg: Config) -> int:
    """How many sizes a run makes: 1, or the common length of its list-valued size keys (a cascade: prune to the
    first size and distil, prune that to the next and distil, ...)."""
    lists = {key: len(_get(cfg, key)) for key in CASCADE_KEYS if isinstance(_get(cfg, key), tuple)}
    if not lists:
        return 1
    if len(set(lists.values())) > 1:
        raise CompactLMError(f"a cascade's size lists differ in length: {', '.join(f'{k} has {n}' for k, n in lists.items())}")
    if cfg.target.drop_layers is not None:
        raise CompactLMError("target.drop_layers cannot be used in a cascade (its indices are the teacher's layers)")
    if cfg.prune.per_layer != "off":
        raise CompactLMError("prune.per_layer cannot be used in a cascade (a per-layer model is not cut again)")
    return next(iter(lists.values()))


def cascade_step(cfg: Config, i: int, teacher: dict[str, int]) -> Config:
    """Size i of a cascade: each list-valued size key replaced by its i-th entry, and every fraction, listed or
    not, made absolute against the teacher's `teacher` sizes (keys as CASCADE_KEYS; "search.target_params": its
    parameter count): in a cascade a fraction is always of the teacher, whatever model the step prunes."""
    sections: dict[str, dict] = {}
    for key in CASCADE_KEYS:
        value = _get(cfg, key)
        value = value[i] if isinstance(value, tuple) else value
        if isinstance(value, float):
            value = max(1, round(value * teacher[key]))
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **values)
                                       for name, values in sections.items()})


def check_one_size(cfg: Config, command: str) -> None:
    """A list of sizes (a cascade) is for `compactlm run`: other commands make one model."""
    if listed := [key for key in CASCADE_KEYS if isinstance(_get(cfg, key), tuple)]:
        raise CompactLMError(f"{listed[0]} lists several sizes (a cascade): only `compactlm run` makes a cascade, "
                             f"`{command}` takes one size")


# What may differ when a run or a training resumes: where it runs, how often it reports and saves, how a
# batch is split over micro-batches (same gradients), what the evaluation measures besides its loss.
MAY_CHANGE_ON_RESUME = frozenset({
    "resume", "device", "out_dir", "trust_remote_code", "eval.speed", "eval.speed_modes", "eval.speed_batches",
    "distill.teacher_cache",
    "eval.tasks", "eval.task_limit", "eval.batch_size", "search.distill_together",
    *(f"{section}.{key}" for section in ("distill", "train", "correction")
      for key in ("micro_batch_size", "eval_every", "save_every", "log_every", "activation_checkpointing",
                  "teacher_sharded", "teacher_offload")),
})


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume(cfg: Any, saved: str | Path, only: tuple[str, ...] | None = None) -> None:
    """One-line error when `cfg` differs from the config a run was started with (its saved compactlm.yaml) in
    a key that changes what it computes; MAY_CHANGE_ON_RESUME lists the keys that may change. `only`: compare
    just these keys and sections ("distill." for a whole section)."""
    path = Path(saved)
    if not path.is_file():
        return
    before, now = _flat(read_yaml(path)), _flat(to_dict(cfg))
    relevant = lambda k: only is None or any(k == o or (o.endswith(".") and k.startswith(o)) for o in only)  # noqa: E731
    changed = [k for k in now if k in before and before[k] != now[k] and k not in MAY_CHANGE_ON_RESUME
               and relevant(k)]
    if changed:
        shown = ", ".join(f"{k} ({before[k]!r} -> {now[k]!r})" for k in changed[:4])
        raise CompactLMError(
            f"resume: {shown} changed since {path.parent} was started; only where it runs and how often it "
            f"reports may change (device, *.micro_batch_size, *.eval_every, *.save_every, ...): "
            f"use the old values or another out_dir")
