"""The one schema: frozen dataclasses filled from YAML plus `key=value` overrides, validated with dotted paths.

Target keys (`target.*`) are named as in Hugging Face configs. A value is an absolute size (int) or a
fraction of the teacher's size to KEEP (float in (0, 1]); a key not given keeps the teacher's value.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from compactlm.errors import CompactLMError


def choice(default: Any, *choices: Any) -> Any:
    """A field whose value must be one of `choices`."""
    return field(default=default, metadata={"choices": choices})


def path_key(default: Any = None) -> Any:
    """A field that names a file, folder or model: a leading `~` is expanded, from YAML and the command line alike."""
    return field(default=default, metadata={"path": True})


INT_LIMIT = 2**63  # every integer key fits in int64 (torch's and numpy's seeds and counters)
SEED_LIMIT = 2**32  # numpy's generators take seeds below 2^32; the data order multiplies the seed by ~1e6
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class InvalidValue(CompactLMError):
    """A value out of range. `key` is relative to its section; `from_dict` prefixes the section's dotted path."""

    def __init__(self, key: str, value: Any, message: str):
        self.key, self.value, self.message = key, value, message
        super().__init__(f"{key}={value!r}: {message}")


def _at_least(section: Any, minimum: float, *keys: str) -> None:
    """Every named field that is set is >= minimum."""
    for key in keys:
        value = getattr(section, key)
        if value is not None and value < minimum:
            raise InvalidValue(key, value, f"must be at least {minimum}")


def _size_or_fraction(section: Any, *keys: str) -> None:
    """Sizes: an int >= 1 (absolute) or a float in (0, 1] (the fraction to keep); or a list of them, one per size
    of a cascade, in decreasing order."""
    for key in keys:
        value = getattr(section, key)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float) and not 0.0 < v <= 1.0:
                raise InvalidValue(key, value, "a fraction must lie in (0, 1] (the share to keep)")
            if isinstance(v, int) and v < 1:
                raise InvalidValue(key, value, "must be at least 1")
        if isinstance(value, tuple):
            if len({type(v) for v in value}) > 1:
                raise InvalidValue(key, value, "a cascade's sizes are all absolute or all fractions")
            if any(b > a for a, b in zip(value, value[1:])):
                raise InvalidValue(key, value, "a cascade's sizes must not grow")


Size = int | float | tuple[int | float, ...] | None  # a tuple: one size per step of a cascade


@dataclass(frozen=True)
class DatasetConfig:
    val_fraction: float = 0.05  # share of documents held out for validation (by a stable hash of their text)
    text_field: str = "text"  # column of .jsonl / .parquet / hub datasets
    split: str = "train"  # hub dataset split
    max_chars: int | None = None  # use only this many characters of the corpus
    max_tokens: int | None = None  # stop reading once the train split holds this many tokens (big/streamed data)

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise InvalidValue("val_fraction", self.val_fraction, "must lie in (0, 1)")
        _at_least(self, 1, "max_chars", "max_tokens")


@dataclass(frozen=True)
class CalibConfig:
    sequences: int = 128  # calibration sequences (P1 used 1024)
    seq_len: int = 256
    batch_size: int = 8
    layer_sequences: int = 32  # the first N calibration sequences serve the depth metrics (one pass per layer)

    def __post_init__(self) -> None:
        _at_least(self, 1, "sequences", "seq_len", "batch_size", "layer_sequences")


@dataclass(frozen=True)
class ImportanceConfig:
    method: str = choice("activation", "activation", "output_aware", "taylor", "magnitude", "random")
    aggregation: str = choice(
        "l2_mean", *(f"{b}_{s}" for b in ("mean", "l2", "var") for s in ("mean", "l2", "var"))
    )  # "<batch>_<sequence>"
    head_score: str = choice("paper", "paper", "channel")  # per-token head norm (P1) or per-channel (Model Optimizer)
    layer_metrics: tuple[str, ...] = ("lm_loss", "block_importance")  # computed by `score`; `prune` adds what it needs
    scores: str | None = path_key()  # reuse a saved scores.safetensors instead of calibrating again


@dataclass(frozen=True)
class PruneConfig:
    reconstruct: str = choice("all", "none", "outputs", "all")  # refit projections by ridge least squares (none: plain slicing)
    reconstruct_inputs: str = choice("sequential", "sequential", "teacher")  # the student's own inputs, or the teacher's
    ridge: float = 1e-3  # ridge penalty, relative to the mean diagonal of the Gram matrix

    def __post_init__(self) -> None:
        if self.ridge < 0:
            raise InvalidValue("ridge", self.ridge, "must be >= 0")


@dataclass(frozen=True)
class TargetConfig:
    hidden_size: Size = None
    intermediate_size: Size = None
    num_attention_heads: Size = None
    num_key_value_heads: Size = None  # fewer than the teacher's drops whole KV groups
    num_hidden_layers: Size = None
    # mixtures of experts, named as each family's config names them: routed experts kept per layer (Qwen3-MoE:
    # num_experts, Mixtral: num_local_experts) and each expert's MLP width (Qwen3-MoE: moe_intermediate_size,
    # Mixtral: intermediate_size)
    num_experts: Size = None
    num_local_experts: Size = None
    moe_intermediate_size: Size = None
    drop_layers: tuple[int, ...] | None = None  # explicit layers to remove (instead of a metric)
    layer_metric: str = choice("lm_loss", "lm_loss", "block_importance", "contiguous", "magnitude", "random")
    # ranks the experts: router weight x output norm summed over the tokens routed to each (reap_sum; the best in
    # benchmarks/bench_moe_experts.py), averaged over them (reap, REAP's own), routing frequency, baselines
    expert_metric: str = choice("reap_sum", "reap_sum", "reap", "frequency", "magnitude", "random")
    keep_last_layer: bool = True  # the contiguous-block search never drops the final layer (P2)
    round_to: int | None = None  # round hidden and ffn targets down to a multiple (Model Optimizer: 64)

    def __post_init__(self) -> None:
        _size_or_fraction(self, "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                          "num_hidden_layers", "num_experts", "num_local_experts", "moe_intermediate_size")
        _at_least(self, 1, "round_to")
        if self.drop_layers is not None and any(i < 0 for i in self.drop_layers):
            raise InvalidValue("drop_layers", list(self.drop_layers), "layer indices start at 0")


@dataclass(frozen=True)
class EvalConfig:
    sequences: int = 64  # validation sequences
    seq_len: int = 256
    batch_size: int = 8
    speed: bool = True  # measure generation tokens/s
    speed_modes: tuple[str, ...] = ("dynamic",)  # KV caches to time: dynamic, static, compiled (static + torch.compile)
    speed_batches: tuple[int, ...] = (1,)  # batch sizes to time generation at
    gen_tokens: int = 32
    prompt: str = "The Python interpreter"  # the report's sample texts continue this prompt
    tasks: tuple[str, ...] = path_key(())  # lm-evaluation-harness task names or local task YAML files (optional extra)
    task_limit: int | None = None  # examples per task

    def __post_init__(self) -> None:
        _at_least(self, 1, "sequences", "seq_len", "batch_size", "gen_tokens", "task_limit")
        for mode in self.speed_modes:
            if mode not in ("dynamic", "static", "compiled"):  # metrics.SPEED_MODES
                raise InvalidValue("speed_modes", self.speed_modes, f"{mode!r} is not one of dynamic, static, compiled")
        if not self.speed_batches or min(self.speed_batches) < 1:
            raise InvalidValue("speed_batches", self.speed_batches, "needs batch sizes >= 1")


@dataclass(frozen=True)
class TrainConfig:
    tokens: int = 2_000_000  # token budget; `steps` wins when given
    steps: int | None = None
    batch_size: int = 8  # global batch, in sequences
    micro_batch_size: int | None = None  # per process and forward; gradient accumulation fills the rest
    seq_len: int = 256
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 50  # steps
    eval_sequences: int = 32
    save_every: int = 50  # steps between checkpoints
    log_every: int = 1
    activation_checkpointing: bool = False
    chunk_tokens: int = 256  # loss and validation logits computed over this many tokens at a time (memory)

    def __post_init__(self) -> None:
        _at_least(self, 1, "tokens", "steps", "batch_size", "micro_batch_size", "seq_len", "eval_sequences",
                  "chunk_tokens")
        _at_least(self, 0, "warmup_steps", "weight_decay", "grad_clip", "eval_every", "save_every", "log_every")
        if self.lr <= 0:
            raise InvalidValue("lr", self.lr, "must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise InvalidValue("min_lr", self.min_lr, f"must lie in [0, lr={self.lr}]")
        if self.steps is None and self.tokens < self.batch_size * self.seq_len:
            raise InvalidValue("tokens", self.tokens, f"less than one global batch (batch_size x seq_len = "
                                                      f"{self.batch_size * self.seq_len} tokens)")


@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    temperature: float = 1.0
    ce_weight: float = 0.0  # optional cross-entropy term mixed with the KL
    intermediate: bool = False  # cosine loss on hidden states through a learned linear map
    layer_map: tuple[tuple[int, int], ...] | None = None  # (student, teacher) block outputs; default last-2 of each
    embedding_loss: bool = False  # also match the embedding outputs
    teacher_sharded: bool = False  # FSDP-shard the teacher too (default: replicate it)
    teacher_offload: bool = False  # with teacher_sharded: keep its shards in CPU memory (FSDP2 CPUOffloadPolicy)
    teacher_top_k: int = 0  # > 0: distil from the teacher's top-K log-probabilities, cached once per row (0: dense)
    teacher_cache: str | None = path_key()  # where the top-K cache lives (default: out_dir/teacher_cache)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise InvalidValue("temperature", self.temperature, "must be > 0")
        _at_least(self, 0, "teacher_top_k")
        if self.teacher_top_k and (self.intermediate or self.layer_map is not None or self.embedding_loss):
            raise InvalidValue("teacher_top_k", self.teacher_top_k, "caches logits only: the hidden-state losses "
                                                                    "(intermediate, layer_map, embedding_loss) need the teacher")
        _at_least(self, 0, "ce_weight")
        if self.teacher_offload and not self.teacher_sharded:
            raise InvalidValue("teacher_offload", True, "offloads the teacher's FSDP shards: set teacher_sharded=true")


@dataclass(frozen=True)
class SearchConfig:
    target_params: Size = None  # "70M", or a fraction of the teacher's parameters; a list: a cascade
    # a mixture of experts: the parameters one token runs through (its top-k experts), "3B" or a fraction
    target_active_params: Size = None
    tolerance: float = 0.05  # candidates within +-5% of target_params (P1)
    layers: tuple[int, ...] | None = None  # grids; None derives one from the teacher
    heads: tuple[int, ...] | None = None
    kv_heads: tuple[int, ...] | None = None  # None keeps the teacher's KV groups
    ffn: tuple[int, ...] | None = None
    hidden: tuple[int, ...] | None = None
    experts: tuple[int, ...] | None = None  # a mixture of experts: routed experts per layer
    divisor: int = 64  # derived hidden/ffn grids use multiples of this (P1/Model Optimizer)
    max_candidates: int = 16  # keep this many, closest to target_params first
    max_latency_ms: float | None = None  # drop candidates slower than this (forward of one sequence, this device)
    top_k: int = 3  # candidates distilled briefly before the final choice
    distill_steps: int = 20  # steps of that short distillation (P1: ~400 at scale)
    distill_together: bool = True  # the top_k step on each batch from one teacher forward (false: one at a time,
    # holding one student and its optimizer state instead of top_k)

    def __post_init__(self) -> None:
        _size_or_fraction(self, "target_params", "target_active_params")
        _at_least(self, 0, "tolerance")
        _at_least(self, 1, "divisor", "max_candidates", "distill_steps")
        _at_least(self, 0, "top_k")
        if self.max_latency_ms is not None and self.max_latency_ms <= 0:
            raise InvalidValue("max_latency_ms", self.max_latency_ms, "must be > 0")

    @property
    def enabled(self) -> bool:
        """A budget is set: the run searches the architecture."""
        return self.target_params is not None or self.target_active_params is not None


@dataclass(frozen=True)
class CorrectionConfig(TrainConfig):
    enabled: bool = False  # P2 teacher correction: fine-tune the teacher briefly on the distillation data first


@dataclass(frozen=True)
class ExportConfig:
    # GGUF tensor type: set, `run` ends with an export stage; `compactlm export` writes f16 when unset
    type: str | None = choice(None, None, "f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class Config:
    model: str = path_key("smollm2-135m")  # hub id, local directory, .gguf file, or a built-in name
    tokenizer: str | None = path_key()  # default: the model's
    teacher: str | None = path_key()
    student: str | None = path_key()
    data: str = path_key("python-docs")  # built-in corpus, a .txt/.jsonl/.parquet path, or a hub dataset name
    out_dir: str | None = path_key()  # required by every command but eval and export
    out: str | None = path_key()  # export: the .gguf file to write
    seed: int = 0
    device: str = "auto"  # auto: cuda when available
    dtype: str = choice("float32", "float32", "bfloat16", "float16")
    memory_gb: float | None = None  # weights above this: score, prune and eval run one decoder layer at a time
    resume: bool = False
    trust_remote_code: bool = False  # let transformers run code shipped with a checkpoint (never asked on stdin)
    init: str = choice("pretrained", "pretrained", "random")
    dataset: DatasetConfig = DatasetConfig()
    calib: CalibConfig = CalibConfig()
    importance: ImportanceConfig = ImportanceConfig()
    target: TargetConfig = TargetConfig()
    prune: PruneConfig = PruneConfig()
    eval: EvalConfig = EvalConfig()
    distill: DistillConfig = DistillConfig()
    train: TrainConfig = TrainConfig(lr=2e-5, min_lr=2e-6)
    search: SearchConfig = SearchConfig()
    correction: CorrectionConfig = CorrectionConfig(tokens=200_000, lr=2e-5, min_lr=2e-6)
    export: ExportConfig = ExportConfig()

    def __post_init__(self) -> None:
        if self.memory_gb is not None and self.memory_gb <= 0:
            raise InvalidValue("memory_gb", self.memory_gb, "must be > 0 (GiB)")
        if not 0 <= self.seed < SEED_LIMIT:
            raise InvalidValue("seed", self.seed, "must lie in [0, 2^32)")
        if not DEVICE.fullmatch(self.device):
            raise InvalidValue("device", self.device, "must be auto, cpu, mps, cuda or cuda:N")


def _type_name(tp: Any) -> str:
    if tp == Size:
        return "a size (an int, a fraction in (0, 1], or a list of them: a cascade)"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (lists to tuples, ints to floats). Numbers
    must be finite (no NaN or infinity: a NaN learning rate or ridge wrote a model of NaN) and fit in int64."""
    value = _convert_type(value, tp, path)
    if isinstance(value, float) and not math.isfinite(value):
        raise CompactLMError(f"{path}: {value!r} is not a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and not -INT_LIMIT < value < INT_LIMIT:
        raise CompactLMError(f"{path}: {value!r} is out of range (at most 2^63 - 1 in size)")
    return value


def _convert_type(value: Any, tp: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        plain = [a for a in args if isinstance(a, type) and a is not type(None)]
        for arg in plain:  # exact types first: 3 stays an int in int|float
            if isinstance(value, arg) and not (arg is int and isinstance(value, bool)):
                return value
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert_type(value, arg, path)
            except CompactLMError:
                pass
        raise CompactLMError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise CompactLMError(f"{path}: expected a list, got {value!r}")
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise CompactLMError(f"{path}: expected {len(item_types)} items, got {value!r}")
        return tuple(_convert(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, item_types)))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, str) and value.strip()[-1:] in "KMB" and value.strip()[:-1].replace(".", "").isdigit():
        return int(float(value.strip()[:-1]) * {"K": 1e3, "M": 1e6, "B": 1e9}[value.strip()[-1]])  # "70M"
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise CompactLMError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a (nested) dict, rejecting unknown keys with their dotted path."""
    if not isinstance(data, dict):
        raise CompactLMError(f"{path or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise CompactLMError(f"unknown config key '{dotted}'")
        value = _convert(value, hints[key], dotted)
        if fields[key].metadata.get("path"):  # a str, None, or a tuple of str
            value = tuple(map(os.path.expanduser, value)) if isinstance(value, tuple) else value and os.path.expanduser(value)
        choices = fields[key].metadata.get("choices")
        if choices and value not in choices:
            raise CompactLMError(f"{dotted}: {value!r} is not one of {', '.join(map(str, choices))}")
        kwargs[key] = value
    for name, f in fields.items():  # nested sections keep their defaults when absent
        if name not in kwargs and dataclasses.is_dataclass(hints[name]) and f.default is not dataclasses.MISSING:
            kwargs[name] = f.default
    try:
        return cls(**kwargs)
    except InvalidValue as e:  # a range check in __post_init__: name the key with its dotted path
        dotted = f"{path}.{e.key}" if path else e.key
        raise CompactLMError(f"{dotted}={e.value!r}: {e.message}") from None


def to_dict(cfg: Any) -> dict:
    """A plain dict (tuples as lists) that `from_dict` reads back to an equal config."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return {
        f.name: to_dict(getattr(cfg, f.name)) if dataclasses.is_dataclass(getattr(cfg, f.name)) else plain(getattr(cfg, f.name))
        for f in dataclasses.fields(cfg)
    }


def parse_overrides(overrides: list[str]) -> dict:
    """`["a.b=3", "c=x"]` -> nested dict; values parsed as YAML scalars or lists."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise CompactLMError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CompactLMError(f"override '{item}' conflicts with another override")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file, with one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CompactLMError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise CompactLMError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CompactLMError(f"config file {path} must hold a mapping of keys")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls: type = Config) -> Any:
    """YAML file (optional) + `key=value` overrides -> a validated frozen config."""
    data = read_yaml(path) if path else {}
    return from_dict(cls, _merge(data, parse_overrides(list(overrides))))


# The size keys that may list one size per step of a cascade (`compactlm run` only).
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
    "resume", "device", "out_dir", "trust_remote_code", "eval.speed", "eval.speed_modes", "eval.speed_batches", "distill.teacher_cache",
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


def save_config(cfg: Any, path: str | Path, header: Sequence[str] = ()) -> None:
    """Write the resolved config beside a run's outputs, `header` lines first as YAML comments."""
    comments = "".join(f"# {line}\n" for line in header)
    Path(path).write_text(comments + yaml.safe_dump(to_dict(cfg), sort_keys=False))
