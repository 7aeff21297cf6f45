"""compactlm: Minitron-style structured pruning and knowledge distillation for Hugging Face causal LMs.

The stages as functions of a resolved config (`compactlm.config.load_config(path, ["key=value", ...])`):

    score(cfg) -> Scores          prune(cfg) -> Path         distill(cfg) -> dict      train(cfg) -> dict
    find_architecture(cfg) -> dict evaluate(cfg) -> dict      run(cfg) -> dict          load_config(...)

Imported lazily, so `import compactlm` stays cheap.
"""

import importlib

__version__ = "0.1.0"

_API = {
    "load_config": ("compactlm.config", "load_config"),
    "score": ("compactlm.stages", "score"),
    "prune": ("compactlm.stages", "prune"),
    "evaluate": ("compactlm.stages", "evaluate"),
    "distill": ("compactlm.distill.run", "run_distill"),
    "train": ("compactlm.distill.run", "run_train"),
    "find_architecture": ("compactlm.pipeline", "search_only"),
    "run": ("compactlm.pipeline", "run"),
    "prune_to": ("compactlm.pruning.verb", "prune_to"),
    "TargetConfig": ("compactlm.config", "TargetConfig"),
    "ImportanceConfig": ("compactlm.config", "ImportanceConfig"),
}
__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'compactlm' has no attribute {name!r}")
    module, attr = _API[name]
    return getattr(importlib.import_module(module), attr)
