"""The one schema: frozen dataclasses, one per section of a config, each field with its type, default, range check
and (in its comment) its meaning, which `compactlm.keys` reads for --help and docs/CONFIG.md.

Target keys (`target.*`) are named as in Hugging Face configs. A value is an absolute size (int) or a
fraction of the teacher's size to KEEP (float in (0, 1]); a key not given keeps the teacher's value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

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
    seq_len: int = 256  # tokens per calibration sequence
    batch_size: int = 8  # calibration sequences per forward
    layer_sequences: int = 32  # the first N calibration sequences serve the depth metrics (one pass per layer)

    def __post_init__(self) -> None:
        _at_least(self, 1, "sequences", "seq_len", "batch_size", "layer_sequences")


@dataclass(frozen=True)
class ImportanceConfig:
    # activation (P1), output_aware (x outgoing weight norm), taylor (first order, a backward pass), baselines
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
    # per-layer widths (pruning/per_layer.py): off keeps the target's shape in every layer; relative or write give
    # each layer its own MLP width and KV groups at the target's parameters (dense families; saved with
    # compactlm_layers in config.json, loaded by compactlm's own loader, not by plain transformers)
    per_layer: str = choice("off", "off", "relative", "write")
    # how far each layer's budget moves from the uniform target's (0) to the rule's global ranking (1); several
    # values: each is cut and the one with the lowest loss on the calibration rows is kept (OWL-style search)
    per_layer_strength: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if self.ridge < 0:
            raise InvalidValue("ridge", self.ridge, "must be >= 0")
        strengths = self.per_layer_strength
        if not strengths or len(set(strengths)) != len(strengths) or not all(0.0 <= s <= 1.0 for s in strengths):
            raise InvalidValue("per_layer_strength", list(strengths), "needs distinct values in [0, 1]")


@dataclass(frozen=True)
class TargetConfig:
    hidden_size: Size = None  # embedding channels kept: an int, or the fraction to keep
    intermediate_size: Size = None  # MLP neurons kept per layer (Mixtral: each expert's width)
    num_attention_heads: Size = None  # query heads kept (inside each KV group unless num_key_value_heads drops some)
    num_key_value_heads: Size = None  # fewer than the teacher's drops whole KV groups
    num_hidden_layers: Size = None  # layers kept, chosen by layer_metric (or drop_layers)
    # mixtures of experts, named as each family's config names them: routed experts kept per layer (Qwen3-MoE:
    # num_experts, Mixtral: num_local_experts) and each expert's MLP width (Qwen3-MoE: moe_intermediate_size,
    # Mixtral: intermediate_size)
    num_experts: Size = None
    num_local_experts: Size = None  # Mixtral's routed experts kept per layer
    moe_intermediate_size: Size = None  # Qwen3-MoE's expert width
    drop_layers: tuple[int, ...] | None = None  # explicit layers to remove (instead of a metric)
    # ranks layers: lm_loss (each layer skipped alone), block_importance (cosine), contiguous (best block, P2)
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
    seq_len: int = 256  # tokens per validation sequence
    batch_size: int = 8  # validation sequences per forward
    speed: bool = True  # measure generation tokens/s
    speed_modes: tuple[str, ...] = ("dynamic",)  # KV caches to time: dynamic, static, compiled (static + torch.compile)
    speed_batches: tuple[int, ...] = (1,)  # batch sizes to time generation at
    gen_tokens: int = 32  # tokens generated per speed measurement and sample
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
    steps: int | None = None  # optimizer steps (overrides tokens)
    batch_size: int = 8  # global batch, in sequences
    micro_batch_size: int | None = None  # per process and forward; gradient accumulation fills the rest
    seq_len: int = 256  # tokens per training sequence
    lr: float = 1e-4  # peak learning rate (AdamW)
    min_lr: float = 1e-5  # the cosine schedule's floor
    warmup_steps: int = 10  # linear warm-up to lr
    weight_decay: float = 0.01  # AdamW's, on matrices only (not norms, biases or embeddings)
    grad_clip: float = 1.0  # gradient norm clipping (0: off)
    eval_every: int = 50  # steps
    eval_sequences: int = 32  # validation sequences at each evaluation during training
    save_every: int = 50  # steps between checkpoints
    log_every: int = 1  # steps between metrics.jsonl lines
    activation_checkpointing: bool = False  # recompute layer activations in the backward pass (less memory)
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
    temperature: float = 1.0  # softens both distributions in the KL (the loss is scaled by its square)
    ce_weight: float = 0.0  # optional cross-entropy term mixed with the KL
    # the logit loss: forward_kl KL(p||q) (Minitron); reverse_kl KL(q||p); skew_kl KL(p||skew p+(1-skew) q) and
    # skew_reverse_kl KL(q||(1-skew) p+skew q) (DistiLLM); jsd: generalised Jensen-Shannon with beta = skew (GKD)
    divergence: str = choice("forward_kl", "forward_kl", "reverse_kl", "skew_kl", "skew_reverse_kl", "jsd")
    skew: float = 0.1  # the mixing weight of skew_kl, skew_reverse_kl and jsd, in (0, 1)
    intermediate: bool = False  # cosine loss on hidden states through a learned linear map
    layer_map: tuple[tuple[int, int], ...] | None = None  # (student, teacher) block outputs; default last-2 of each
    embedding_loss: bool = False  # also match the embedding outputs
    teacher_sharded: bool = False  # FSDP-shard the teacher too (default: replicate it)
    teacher_offload: bool = False  # with teacher_sharded: keep its shards in CPU memory (FSDP2 CPUOffloadPolicy)
    teacher_top_k: int = 0  # > 0: distil from the teacher's top-K log-probabilities, cached once per row (0: dense)
    # what the cache keeps of the teacher per token: sampled, the shares of K draws from it (random-sampling KD:
    # an unbiased estimate of its distribution; benchmarks/bench_teacher_cache.py: as good as dense KD at K=64);
    # top_k, its K most likely tokens and the rest as one outcome (biased: the tail takes the student's shape)
    teacher_targets: str = choice("sampled", "top_k", "sampled")
    teacher_cache: str | None = path_key()  # where the top-K cache lives (default: out_dir/teacher_cache)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise InvalidValue("temperature", self.temperature, "must be > 0")
        _at_least(self, 0, "teacher_top_k")
        if not 0 < self.skew < 1:
            raise InvalidValue("skew", self.skew, "must lie in (0, 1)")
        if self.teacher_top_k and self.divergence != "forward_kl":
            raise InvalidValue("teacher_top_k", self.teacher_top_k, f"distils with forward_kl only, not "
                                                                    f"divergence={self.divergence}")
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
    heads: tuple[int, ...] | None = None  # query heads to try
    kv_heads: tuple[int, ...] | None = None  # None keeps the teacher's KV groups
    ffn: tuple[int, ...] | None = None  # MLP widths to try
    hidden: tuple[int, ...] | None = None  # hidden sizes to try
    experts: tuple[int, ...] | None = None  # a mixture of experts: routed experts per layer
    divisor: int = 64  # derived hidden/ffn grids use multiples of this (P1/Model Optimizer)
    max_candidates: int = 16  # keep this many, closest to target_params first
    max_latency_ms: float | None = None  # drop candidates slower than this (forward of one sequence, this device)
    top_k: int = 3  # candidates distilled briefly before the final choice
    distill_steps: int = 20  # steps of that short distillation (P1: ~400 at scale)
    # the top_k step on each batch from one teacher forward (false: one at a time, holding one student and its
    # optimizer state instead of top_k)
    distill_together: bool = True

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
    teacher: str | None = path_key()  # the model distilled from and compared against
    student: str | None = path_key()  # distill: the model trained (a pruned checkpoint)
    data: str = path_key("python-docs")  # built-in corpus, a .txt/.jsonl/.parquet path, or a hub dataset name
    out_dir: str | None = path_key()  # required by every command but eval and export
    out: str | None = path_key()  # export: the .gguf file to write
    seed: int = 0  # one seed for calibration rows, data order and initialisation: the same seed, the same model
    device: str = "auto"  # auto: cuda when available
    # the models' weights (bfloat16: a sharded student also gathers and computes in it)
    dtype: str = choice("float32", "float32", "bfloat16", "float16")
    # training forwards in bf16 autocast: auto = on CUDA and on a CPU with AVX512-BF16/AMX (faster there; slower
    # elsewhere); bf16 = always; off = float32. Weights, optimizer and the loss's softmax stay float32
    autocast: str = choice("auto", "auto", "bf16", "off")
    memory_gb: float | None = None  # weights above this: score, prune and eval run one decoder layer at a time
    resume: bool = False  # distill/train: continue from the last checkpoint in out_dir (run always resumes)
    trust_remote_code: bool = False  # let transformers run code shipped with a checkpoint (never asked on stdin)
    init: str = choice("pretrained", "pretrained", "random")  # train: start from the weights, or from scratch
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
