"""Training checkpoints (resumable, atomic, latest only) and Hugging Face exports of trained weights.

A training checkpoint is the folder `out_dir/checkpoint/` holding

    trainer_state.pt   torch.save of {"model": student state dict (HF keys), "hidden_map": its state dict or
                       None, "optimizer": AdamW state keyed by parameter name, "scheduler": LambdaLR state,
                       "rng": [per-rank RNG states], "progress": Progress as a dict}
    progress.json      the same Progress, readable by people and scripts (step, tokens, rows_seen, ...)

It is written into `out_dir/.checkpoint.tmp/`, then swapped in with two renames (old -> `.checkpoint.old`,
new -> `checkpoint`); a crash between the two leaves `.checkpoint.old`, which `latest` then uses. Every file
loads with `torch.load(weights_only=True)`: RNG states are stored as tensors and plain Python values.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compactlm.distill.distributed import Dist, barrier, full_state, gather_objects, load_full_state_
from compactlm.errors import CompactLMError, read_json
from compactlm.models.loading import save_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.pt"
PROGRESS_FILE = "progress.json"
_TMP, _OLD = ".checkpoint.tmp", ".checkpoint.old"


@dataclass
class Progress:
    """Where a run is: optimizer steps done, tokens and train rows consumed, best validation loss so far."""

    step: int = 0
    tokens: int = 0
    rows_seen: int = 0  # position in the endless stream of per-epoch shuffles of the train rows
    best_val_loss: float = math.inf
    total_steps: int = 0

    def to_record(self) -> dict:
        """A JSON-safe dict (an infinite best_val_loss becomes None)."""
        record = dataclasses.asdict(self)
        record["best_val_loss"] = None if math.isinf(self.best_val_loss) else self.best_val_loss
        return record

    @classmethod
    def from_record(cls, record: dict) -> Progress:
        """Inverse of `to_record`."""
        best = record.get("best_val_loss")
        return cls(**record | {"best_val_loss": math.inf if best is None else best})


def latest(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder under `out_dir`, or None."""
    for name in (CHECKPOINT_DIR, _OLD):
        path = Path(out_dir) / name
        if (path / STATE_FILE).is_file() and (path / PROGRESS_FILE).is_file():
            return path
    return None


def read_progress(path: str | Path) -> Progress:
    """Progress recorded in a checkpoint folder."""
    return Progress.from_record(read_json(Path(path) / PROGRESS_FILE))


def save(out_dir: str | Path, state: dict, progress: Progress) -> Path:
    """Write `state` (+ progress) as out_dir/checkpoint/, replacing the previous one atomically."""
    out = Path(out_dir)
    tmp, old, final = out / _TMP, out / _OLD, out / CHECKPOINT_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    record = progress.to_record()
    try:  # a full disk: the previous checkpoint stays as it was, and no partial one is left
        torch.save(state | {"progress": record}, tmp / STATE_FILE)
        (tmp / PROGRESS_FILE).write_text(json.dumps(record) + "\n")
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(out)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    """Flush a folder's files and its entries to disk (so a rename never exposes unwritten data)."""
    for file in path.iterdir():
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: str | Path) -> dict:
    """The state dict a checkpoint folder holds (tensors on the CPU, memory-mapped)."""
    file = Path(path) / STATE_FILE
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:  # weights_only=True refuses anything but tensors and plain data
        raise CompactLMError(f"cannot read checkpoint {file}: it holds objects other than tensors and plain data, "
                             "which are never unpickled (not a compactlm training state)") from None
    except (RuntimeError, OSError, EOFError) as e:
        raise CompactLMError(f"cannot read checkpoint {file}: {str(e).splitlines()[0]}") from None


def rng_state() -> dict:
    """This process's RNG states: torch, CUDA (when present), Python `random`, numpy (tensors, plain data)"""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state_(state: dict) -> None:
    """Restore RNG states saved by `rng_state`."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def export(config, state_dict: dict, tokenizer, out: str | Path) -> Path:
    """Save a full state dict of `config`'s architecture as a plain Hugging Face checkpoint (atomic)."""
    from transformers import AutoModelForCausalLM

    from compactlm.models.family import family_of
    from compactlm.models.layer_shapes import assign_shapes, layer_records

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    records = layer_records(config)
    if records:  # layers of their own widths (prune.per_layer)
        assign_shapes(model, family_of(model), records, state_dict)
    model.load_state_dict(state_dict, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return save_checkpoint(model, tokenizer, out)


# ---------------------------------------------------------------- a training module <-> checkpoint / export
# `trainee` is the loop's root module: `.model` (the HF student) and `.hidden_map` (nn.Linear or None).

def save_state(out_dir: Path, trainee: nn.Module, optimizer, scheduler, progress: Progress, d: Dist) -> None:
    """Gather full state dicts and all ranks' RNG states; rank 0 writes out_dir/checkpoint/ (collective)."""
    model_sd, optim_sd = full_state(trainee, optimizer)
    rngs = gather_objects(rng_state(), d)
    if d.is_main:
        state = {"model": _sub(model_sd, "model."), "hidden_map": _sub(model_sd, "hidden_map.") or None,
                 "optimizer": optim_sd, "scheduler": scheduler.state_dict(), "rng": rngs}
        save(out_dir, state, progress)
    barrier(d)


def resume_(path: Path, trainee: nn.Module, optimizer, scheduler, d: Dist) -> Progress:
    """Load a checkpoint into the (maybe sharded) trainee, optimizer, scheduler and RNGs; its Progress."""
    state = load(path)
    if (state["hidden_map"] is None) != (trainee.hidden_map is None):
        raise CompactLMError(f"checkpoint {path} was written with a different distill.intermediate/layer_map/"
                             "embedding_loss setting")
    model_sd = {f"model.{k}": v for k, v in state["model"].items()}
    model_sd |= {f"hidden_map.{k}": v for k, v in (state["hidden_map"] or {}).items()}
    try:
        load_full_state_(trainee, optimizer, model_sd, state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        reason = str(e).splitlines()[0][:200]
        raise CompactLMError(f"checkpoint {path} does not fit this student: {reason}") from None
    scheduler.load_state_dict(state["scheduler"])
    rngs = state["rng"]
    set_rng_state_(rngs[d.rank] if d.rank < len(rngs) else rngs[0])
    return Progress.from_record(state["progress"])


def export_(out: Path, trainee: nn.Module, tokenizer, d: Dist) -> None:
    """Write the student as a plain HF checkpoint at `out`, gathered to rank 0 (all ranks call)."""
    model_sd, _ = full_state(trainee)
    if d.is_main:
        export(trainee.model.config, _sub(model_sd, "model."), tokenizer, out)
    barrier(d)


def _sub(sd: dict, prefix: str) -> dict:
    """The entries of `sd` under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
