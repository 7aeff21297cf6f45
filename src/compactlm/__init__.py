"""compactlm: Minitron-style structured pruning and knowledge distillation for Hugging Face causal LMs.

The stages, each a function of a resolved config (`load_config(path, ["key=value", ...])`) returning a dict:

    score(cfg)   prune(cfg)   search(cfg)   distill(cfg)   train(cfg)   evaluate(cfg)   report(cfg)   run(cfg)

and one call to prune a model you already hold: `prune_to(model, TargetConfig(...), batches)`.
Imported lazily, so `import compactlm` stays cheap.
"""

import importlib

__version__ = "0.1.0"

_API = {
    "load_config": ("compactlm.config", "load_config"),
    "score": ("compactlm.stages", "score"),
    "prune": ("compactlm.stages", "prune"),
    "search": ("compactlm.stages", "search"),
    "distill": ("compactlm.stages", "distill"),
    "train": ("compactlm.stages", "train"),
    "evaluate": ("compactlm.stages", "evaluate"),
    "report": ("compactlm.stages", "report"),
    "run": ("compactlm.pipeline", "run"),
    "prune_to": ("compactlm.api", "prune_to"),
    "TargetConfig": ("compactlm.config", "TargetConfig"),
    "ImportanceConfig": ("compactlm.config", "ImportanceConfig"),
}
__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'compactlm' has no attribute {name!r}")
    module, attr = _API[name]
    return getattr(importlib.import_module(module), attr)
