"""Downstream tasks through lm-evaluation-harness (the optional extra `pip install lm-eval`).

A task is a registered lm-eval name ("hellaswag"), a task YAML file, or a directory of task YAMLs (its
groups, or its tasks when it defines no group). lm-eval's built-in index (~15k YAMLs, tens of seconds to
scan) is only built when some task is a registered name. Every task is built, and so its dataset loaded,
by `load_tasks` before any model loads (the eval commands call it first), so a task that cannot be loaded
(unknown name, offline, missing file) fails in the first seconds with a one-line error naming it. Note that datasets resolves a relative `data_files` path in a YAML
against the working directory, not against the YAML file.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from compactlm.errors import CompactLMError

log = logging.getLogger(__name__)

__all__ = ["Tasks", "load_tasks", "run_tasks"]

MISSING = "eval.tasks needs lm-evaluation-harness: pip install lm-eval"
NOT_METRICS = {"sample_len", "samples"}  # lm-eval's example counts beside the metrics
BOOTSTRAP_ITERS = 1000  # stderr draws for metrics without a closed form (mean-type metrics have one)


def _lm_eval():
    """(simple_evaluate, HFLM, TaskManager), or a one-line error when lm-eval is not installed."""
    try:
        import lm_eval  # noqa: F401  # the package itself first: a stale submodule must not mask its absence
        from lm_eval.evaluator import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        if e.name == "lm_eval":
            raise CompactLMError(MISSING) from None
        raise CompactLMError(f"lm-evaluation-harness is installed but cannot import: {e}") from None
    return simple_evaluate, HFLM, TaskManager


def _is_path(spec: str) -> bool:
    path = Path(spec).expanduser()
    return path.suffix in (".yaml", ".yml") or path.is_dir() or "/" in spec


def _dir_tasks(manager, folder: Path, spec: str) -> list[str]:
    """Names defined by YAMLs under `folder`: its groups, or its tasks when it has no group."""
    def inside(name: str) -> bool:
        yaml_path = manager.task_index[name].yaml_path
        return yaml_path is not None and folder in yaml_path.parents

    names = [n for n in manager.all_groups if inside(n)] or [n for n in manager.all_subtasks if inside(n)]
    if not names:
        raise CompactLMError(f"eval.tasks: directory {spec} holds no lm-eval task YAML")
    return names


def _top_level(loaded: dict) -> list:
    """The Task/Group objects that TaskManager.load built for one spec (groups hold their children)."""
    if not loaded["groups"]:
        return list(loaded["tasks"].values())
    children = {c for names in loaded["group_map"].values() for c in names}
    return [g for name, g in loaded["groups"].items() if name not in children]


def _build(manager, spec: str, name: str) -> list:
    """Build one task (this loads its dataset); any failure becomes a one-line error naming `spec`."""
    try:
        return _top_level(manager.load([name]))
    except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, DatasetGenerationError, ...
        first = (str(e).strip().splitlines() or [""])[0]
        raise CompactLMError(
            f"eval.tasks: cannot load task {spec!r} or its dataset: {type(e).__name__}: {first}") from e


def _load_tasks(tasks: Sequence[str], TaskManager) -> tuple[object, list]:
    """(a TaskManager, the built Task/Group objects of every spec, in order)."""
    folders = [Path(t).expanduser().resolve() for t in tasks if Path(t).expanduser().is_dir()]
    defaults = any(not _is_path(t) for t in tasks)
    manager = TaskManager(include_path=[str(f) for f in folders] or None, include_defaults=defaults)
    built = []
    for spec in tasks:
        path = Path(spec).expanduser()
        if path.is_dir():
            for name in _dir_tasks(manager, path.resolve(), spec):
                built += _build(manager, spec, name)
        elif _is_path(spec):
            if not path.is_file():
                raise CompactLMError(f"eval.tasks: task file {spec} does not exist")
            built += _build(manager, spec, str(path.resolve()))
        elif spec in manager.all_tasks:
            built += _build(manager, spec, spec)
        else:
            raise CompactLMError(f"eval.tasks: {spec!r} is neither a registered lm-eval task nor a task YAML")
    return manager, built


def _numeric(metrics: dict) -> dict[str, float]:
    """Numeric metrics only; lm-eval's "acc,none" (no filter) becomes "acc", other filters stay."""
    out = {}
    for key, value in metrics.items():
        if key in NOT_METRICS or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[key.removesuffix(",none")] = float(value)
    return out


@contextlib.contextmanager
def _on_device(model, device: str) -> Iterator[None]:
    """Run on `device` in eval mode with the caller's RNG state kept; restore device and mode afterwards."""
    home, training = next(model.parameters()).device, model.training
    target = torch.device(device)
    cuda = [target.index or 0] if target.type == "cuda" else []
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=cuda):  # simple_evaluate reseeds random, numpy and torch
            yield model.to(target).eval()
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        model.to(home).train(training)


class Tasks(NamedTuple):
    """lm-eval tasks built once (their datasets loaded), to run on one model or several."""

    specs: tuple[str, ...]  # as the user gave them (eval.tasks)
    manager: object  # lm-eval's TaskManager
    built: list  # its Task/Group objects, in order


def load_tasks(tasks: Sequence[str]) -> Tasks | None:
    """Build every task of `tasks` (None when there are none): the commands call it before loading any model,
    so that a task that cannot load fails in the first seconds, not after the perplexity pass."""
    if not tasks:
        return None
    manager, built = _load_tasks(list(tasks), _lm_eval()[2])
    return Tasks(tuple(tasks), manager, built)


def run_tasks(model, tokenizer, tasks: Sequence[str] | Tasks | None, *, limit: int | None = None, batch_size: int = 8,
              device: str = "cpu") -> dict[str, dict[str, float]]:
    """{task or group name: {metric: value}} from lm-eval, numeric metrics only; limit = examples per task.
    `tasks`: as `load_tasks` returns them, or their specs (then built here)."""
    if not isinstance(tasks, Tasks):
        tasks = load_tasks(tasks or ())
    if tasks is None:
        return {}
    simple_evaluate, HFLM, _ = _lm_eval()
    manager, built = tasks.manager, tasks.built
    log.info("lm-eval: %d task(s) from %s, limit=%s", len(built), list(tasks.specs), limit)
    with _on_device(model, device):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = simple_evaluate(model=lm, tasks=built, limit=limit, task_manager=manager, log_samples=False,
                                  bootstrap_iters=BOOTSTRAP_ITERS)
    if results is None:  # not rank 0 of a distributed run
        return {}
    out = {name: _numeric(metrics) for name, metrics in results["results"].items()}
    log.info("lm-eval results: %s", out)
    return out
