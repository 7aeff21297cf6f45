"""What a stage reads, resolved from its config: models, tokenizer, data splits, importance scores; and how it
writes (staged output, the resolved config beside it).

The stage functions themselves live in stages.py; these helpers carry no stage logic of their own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from compactlm import data
from compactlm.config import Config, TrainConfig
from compactlm.errors import CompactLMError
from compactlm.importance.scores import Scores
from compactlm.metrics import vocab_size
from compactlm.models.family import Dims, Family, family_of
from compactlm.models.loading import load_model, load_model_config, load_tokenizer, pick_device, spread_over_gpus

log = logging.getLogger(__name__)

CONFIG_FILE = "compactlm.yaml"


# ---------------------------------------------------------------- output

def check_out_dir(out_dir: str | Path) -> Path:
    """A one-line error unless `out_dir` is (or can become) a writable folder."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CompactLMError(f"out_dir {out} is a file, not a folder")
    _probe_writable(out, (out, *out.parents), f"out_dir {out}")
    return out


def check_out_file(out: str | Path, key: str = "out") -> Path:
    """A one-line error unless the file `out` can be written: not a folder, under folders (not files), in a place
    this process may write."""
    out = Path(out)
    if out.is_dir():
        raise CompactLMError(f"{key}={out} is a folder: give a file name")
    _probe_writable(out, out.parents, f"{key}={out}")
    return out


def _probe_writable(out: Path, candidates, what: str) -> None:
    """The nearest existing folder among `candidates` must be a folder this process can create a file in: a real
    probe, since permissions, read-only mounts and root's exemptions all answer the same way."""
    parent = next((p for p in candidates if p.exists()), Path("."))
    if not parent.is_dir():
        raise CompactLMError(f"{what}: {parent} is a file, not a folder")
    try:
        os.unlink(tempfile.mkstemp(prefix=".compactlm-probe.", dir=parent)[1])
    except OSError as e:
        raise CompactLMError(f"{what}: cannot write in {parent} ({e.strerror})") from None


@contextlib.contextmanager
def staged_output(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temp dir beside `out_dir`; on success move its entries into `out_dir`, on failure delete it. Beside
    the folder `out_dir` resolves to: a symlink to another file system gets its staging there, where the moves
    are renames (from the link's own folder they would fail with EXDEV after all the work)."""
    out = check_out_dir(out_dir).resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging.", dir=out.parent))
    except OSError as e:  # what changed since the probe: a full disk, a folder removed meanwhile
        raise CompactLMError(f"out_dir {out}: cannot write there ({e.strerror})") from None
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


# ---------------------------------------------------------------- models and data

def check_seq_len(model_or_config, seq_len: int, key: str) -> None:
    """A sequence length above the model's maximum position is an error naming the key."""
    config = getattr(model_or_config, "config", model_or_config)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and seq_len > limit:
        raise CompactLMError(f"{key}={seq_len} exceeds the model's maximum sequence length {limit}")


def load(cfg: Config, spec: str | None = None):
    """(model, tokenizer) for `spec` (default cfg.model) on the configured device and dtype."""
    spec = spec or cfg.model
    tokenizer = _tokenizer(cfg, spec)
    device = pick_device(cfg.device)
    spread = spread_over_gpus(load_model_config(spec), cfg.dtype, device) if cfg.memory_gb is None else None
    return load_model(spec, dtype=cfg.dtype, device=device, device_map=spread), tokenizer


def _tokenizer(cfg: Config, spec: str):
    """The tokenizer for `spec`; one line when it has more tokens than the model's embedding has rows (its ids
    would index past it: an IndexError deep in the first forward)."""
    if cfg.tokenizer == "char":  # chartok.CHAR: built from the data by run/train/distill, read from its folder here
        raise CompactLMError("tokenizer=char is built by run, train and distill; here pass the folder it was "
                             "saved to: tokenizer=RUN_DIR/tokenizer")
    tokenizer = load_tokenizer(cfg.tokenizer or spec)
    config = load_model_config(spec)
    vocab = family_of(config).dims(config).vocab
    if len(tokenizer) > vocab:
        raise CompactLMError(f"tokenizer {cfg.tokenizer or spec} has {len(tokenizer)} tokens, more than the "
                             f"{vocab} rows of {spec}'s embedding: use the model's own tokenizer")
    return tokenizer


@dataclasses.dataclass(frozen=True)
class ModelRecord:
    """A model spec resolved once: its config, family and shape, and whether it is a local safetensors checkpoint
    (what streamed surgery and layer-by-layer loading read). Built before any weights load."""

    spec: str
    config: object  # transformers' PretrainedConfig
    family: Family
    dims: Dims
    local: bool


def resolve(spec: str) -> ModelRecord:
    """`spec` (hub id, folder, .gguf, built-in name) read once into a ModelRecord: a bad config or an unsupported
    family is one line here, before any work."""
    config = load_model_config(spec)
    family = family_of(config)
    return ModelRecord(spec, config, family, family.dims(config), local_safetensors(spec))


def local_safetensors(spec: str) -> bool:
    """A local folder holding a safetensors checkpoint (model.safetensors or its sharded index)."""
    path = Path(spec)
    return path.is_dir() and ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file())


def layerwise(cfg: Config, spec: str | None = None, head: bool = False):
    """A `Layerwise` of `spec` (default cfg.model) when `memory_gb` is set and its weights, in `dtype`, exceed
    it; None when they fit (or no budget is set): then the model loads whole.

    Hidden states between layers stay in memory up to half the budget less one layer's weights, the rest
    goes to temporary files. Layer by layer runs on the CPU."""
    from compactlm.models.layerwise import Layerwise
    from compactlm.models.loading import DTYPES
    from compactlm.models.params import params_of_config

    if cfg.memory_gb is None:
        return None
    spec = spec or cfg.model
    dtype = DTYPES[cfg.dtype]
    need, budget = params_of_config(load_model_config(spec)) * dtype.itemsize, int(cfg.memory_gb * 2**30)
    if need <= budget:
        log.info("%s: %.2f GB of weights fit memory_gb=%s: loading it whole", spec, need / 2**30, cfg.memory_gb)
        return None
    if family_of(load_model_config(spec)).moe:
        raise CompactLMError(f"memory_gb={cfg.memory_gb}: layer by layer does not read mixtures of experts yet "
                             f"({spec} needs {need / 2**30:.1f} GB)")
    if not local_safetensors(spec):
        raise CompactLMError(f"memory_gb={cfg.memory_gb}: {spec} needs {need / 2**30:.1f} GB and layer-by-layer "
                             "reads a local safetensors checkpoint: save it with save_pretrained first")
    if pick_device(cfg.device).type != "cpu":
        log.warning("memory_gb: layer by layer runs on the CPU")
    model = Layerwise(spec, dtype, head=head)
    model.spill_bytes = max(0, budget // 2 - model.layer_bytes())
    log.info("%s: %.2f GB of weights exceed memory_gb=%s: one decoder layer (%.2f GB) at a time",
             spec, need / 2**30, cfg.memory_gb, model.layer_bytes() / 2**30)
    return model


def load_within(cfg: Config, spec: str | None = None, head: bool = False):
    """(model, tokenizer) like `load`, the model a `Layerwise` when it exceeds `memory_gb` (see `layerwise`)."""
    spec = spec or cfg.model
    lw = layerwise(cfg, spec, head)
    return load(cfg, spec) if lw is None else (lw, _tokenizer(cfg, spec))


CALIB_POOL = 4  # calibration rows are drawn from at least 4x as many train rows
READ_AT_LEAST = 20_000_000  # train tokens a stage reads of a big source even when it needs fewer


def load_splits(cfg: Config, tokenizer, seq_len: int, calib: bool = True, train_tokens: int = 0,
                val_rows: int = 0) -> data.Splits:
    """Calibration (unless `calib` is False), train and validation rows of `cfg.data` at `seq_len`, from the
    token store of (data, tokenizer): tokenised once, memory-mapped, read on demand (tokenstore.py).

    The store is read (and built) only as far as the stage needs: `train_tokens` train tokens (calibration: a
    pool of CALIB_POOL x its rows), but at least READ_AT_LEAST (a small corpus: all of it), so that calibration
    samples and training shuffles draw from a wide pool, and at most `dataset.max_tokens` when it is set; and
    `val_rows` validation rows. The rows are those of the documents read until both splits held that much
    (`TokenStore.prefix`), however far an earlier, longer run extended the store: a function of the config.
    """
    from compactlm.tokenstore import Source, open_store

    pool = CALIB_POOL * cfg.calib.sequences * seq_len if calib else 0
    limit = max(train_tokens, pool, READ_AT_LEAST)
    if cfg.dataset.max_tokens is not None:
        limit = min(limit, max(cfg.dataset.max_tokens, seq_len))
    ds = cfg.dataset
    store = open_store(Source(cfg.data, ds.text_field, ds.split, ds.max_chars, ds.val_fraction), tokenizer, limit,
                       val_rows * seq_len)
    n_train, n_val = store.prefix(limit, val_rows * seq_len)  # not all it holds: rows must not depend on its history
    train, val = store.rows("train", seq_len, n_train), store.rows("val", seq_len, n_val)
    for name, rows, tokens in (("train", train, n_train), ("validation", val, n_val)):
        if len(rows) == 0 and (name == "train" or val_rows):
            raise CompactLMError(f"{name} split has {tokens} tokens, fewer than seq_len={seq_len}: use more text or "
                                 f"a smaller seq_len")
    keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
    keep = keep[: cfg.calib.sequences if calib else 0].sort().values
    log.info("splits: %d train, %d val, %d calib rows of %d tokens", len(train), len(val), len(keep), seq_len)
    return data.Splits(calib=train[keep], train=train, val=val)


def same_vocabulary(teacher_spec: str, teacher, student_spec: str, student, cfg: Config) -> None:
    """KD compares token distributions: one-line error unless both models use the same vocabulary."""
    if vocab_size(teacher) != vocab_size(student):
        raise CompactLMError(f"teacher {teacher_spec} has a vocabulary of {vocab_size(teacher)}, student "
                             f"{student_spec} of {vocab_size(student)}: distillation needs the same tokenizer")
    if cfg.tokenizer:  # one tokenizer given for both
        return
    t_vocab, s_vocab = load_tokenizer(teacher_spec).get_vocab(), load_tokenizer(student_spec).get_vocab()
    if t_vocab != s_vocab:
        differ = sorted(set(t_vocab.items()) ^ set(s_vocab.items()), key=str)[:1]
        raise CompactLMError(f"teacher {teacher_spec} and student {student_spec} have different tokenizers "
                             f"(e.g. {differ[0][0]!r}): distillation needs the same vocabulary")


def _fit_to_tokenizer(config, tokenizer):
    """A model config for fresh weights: vocab_size = len(tokenizer), bos/eos/pad ids from the tokenizer."""
    eos = tokenizer.eos_token_id
    ids = {"vocab_size": len(tokenizer), "eos_token_id": eos,
           "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
           "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos}
    for key, value in ids.items():
        if value is not None and getattr(config, key, None) != value:
            log.info("init=random: %s %s -> %s (from the tokenizer)", key, getattr(config, key, None), value)
            setattr(config, key, value)
    return config


def load_trainee(cfg: Config, tc: TrainConfig, section: str, spec: str, device: torch.device):
    """(model to train, in float32; its tokenizer): `spec`'s weights, or fresh ones with init=random."""
    tokenizer = load_tokenizer(cfg.tokenizer or spec)
    if cfg.init == "random":  # the architecture only: a config-only directory is enough
        from transformers import AutoModelForCausalLM

        config = _fit_to_tokenizer(load_model_config(spec), tokenizer)
        torch.manual_seed(cfg.seed)  # every rank builds the same weights
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
        log.info("init=random: %s architecture with fresh weights (seed %d), vocabulary %d",
                 spec, cfg.seed, config.vocab_size)
    else:
        model = load_model(spec, dtype="float32", device=device)
        if len(tokenizer) > vocab_size(model):
            raise CompactLMError(f"tokenizer {cfg.tokenizer or spec} has {len(tokenizer)} tokens, more than "
                                 f"the vocabulary ({vocab_size(model)}) of {spec}")
    check_seq_len(model, tc.seq_len, f"{section}.seq_len")
    return model, tokenizer


# ---------------------------------------------------------------- importance scores

def calibration_batches(cfg: Config, tokenizer, model) -> list[dict[str, torch.Tensor]]:
    """The calibration split as a list of batches."""
    check_seq_len(model, cfg.calib.seq_len, "calib.seq_len")
    splits = load_splits(cfg, tokenizer, cfg.calib.seq_len)
    return list(data.batches(splits.calib, cfg.calib.batch_size))


def add_layer_metrics(cfg: Config, model, batches: list, scores: Scores, names: tuple[str, ...]) -> Scores:
    """Scores with the named depth metrics added, computed on the first `calib.layer_sequences` rows."""
    from compactlm.importance.layers import with_depth_metrics

    if all(n in scores.layers for n in names):
        return scores
    rows = torch.cat([b["input_ids"] for b in batches])[: cfg.calib.layer_sequences]  # (N, S), packed: no padding
    return with_depth_metrics(model, data.batches(rows, cfg.calib.batch_size), scores, names)


def saved_scores(cfg: Config, dims) -> Scores | None:
    """The scores file `importance.scores` names, checked against the model's shape `dims`; None when unset."""
    if not cfg.importance.scores:
        return None
    scores = Scores.load(cfg.importance.scores)
    scores.check(dims, f"importance.scores: {cfg.importance.scores}")
    return scores


def scores_for(cfg: Config, model, tokenizer, needed: tuple[str, ...], saved: Scores | None = None) -> Scores:
    """Saved scores when `importance.scores` is given (checked against the model's shape; `saved`: already
    loaded), else fresh ones from the calibration split; then every depth metric in `needed` that they lack."""
    from compactlm.importance import score as score_model

    batches: list | None = None
    scores = saved if saved is not None else saved_scores(cfg, family_of(model).dims(model.config))
    if scores is None:
        batches = calibration_batches(cfg, tokenizer, model)
        imp = cfg.importance
        scores = score_model(model, batches, method=imp.method, aggregation=imp.aggregation,
                             head_score=imp.head_score, layer_metrics=(), seed=cfg.seed, progress=True)
        scores = dataclasses.replace(scores, meta=scores.meta | {"model": cfg.model})
    if any(n not in scores.layers for n in needed):
        scores = add_layer_metrics(cfg, model, batches or calibration_batches(cfg, tokenizer, model), scores, needed)
    return scores
