"""Model families as data: where each family keeps its weights, and what every weight's axes mean.

One `Family` record per architecture. Surgery, importance hooks and config edits read these records and
never sniff module names. Axis labels used in `layer_params` / `global_params`:

- "hidden": a residual-stream channel (one global keep shared by every layer)
- "ffn":    an MLP neuron (each layer keeps its own)
- "q":      a query/attention-output channel, heads * head_dim, sliced in head_dim blocks
- "kv":     a key/value channel, kv_heads * head_dim
- "qkv":    a fused [q | k | v] axis (GPT-2's c_attn, Phi-3's qkv_proj)
- "ffn2":   a fused [gate | up] axis, two blocks of MLP neurons (Phi-3's gate_up_proj)
- "expert": a routed expert of a mixture-of-experts layer (each layer keeps its own; the router's rows too)
- "effn", "effn2": an expert's MLP neurons, and its fused [gate | up] rows: each kept expert keeps its own
  neurons, so these axes are sliced per expert (they follow an "expert" axis at dim 0)
- None:     an axis that pruning never touches (vocabulary, positions, head_dim of q/k norms)
"""

from __future__ import annotations

from dataclasses import dataclass

from compactlm.errors import CompactLMError

Axes = tuple[str | None, ...]


@dataclass(frozen=True)
class Dims:
    """The shape of a model: what a pruning target names and the parameter count depends on."""

    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    experts: int = 0  # routed experts per layer (0: a dense model); `ffn` is then each expert's width
    top_k: int = 0  # experts each token is routed to

    @property
    def groups(self) -> int:
        """Query heads per KV group."""
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class Family:
    """Everything compactlm needs to know about one Hugging Face model family."""

    name: str
    model_types: tuple[str, ...]
    base_path: str  # the decoder without the LM head: returns last_hidden_state (after the final norm)
    layers_path: str
    embed_path: str
    lm_head_path: str
    final_norm_path: str
    attn_out_path: str  # per layer: module whose *input* is the attention output before its projection
    mlp_out_path: str  # per layer: module whose *input* is the post-activation MLP neurons
    # per layer: every norm whose output channels score the hidden size (pre- and post-norms alike)
    norm_paths: tuple[str, ...]
    # per norm of norm_paths: which projections read its output, "attn" (q/k/v), "mlp" (gate/up) or None (a
    # post-norm: it writes the residual stream); `importance.baselines.outgoing_norms` weighs each site by these
    norm_reads: tuple[str | None, ...]
    layer_params: dict[str, Axes]  # per layer, suffix after "<layers_path>.<i>."
    global_params: dict[str, Axes]
    keys: dict[str, str]  # Dims field -> config attribute
    explicit_head_dim: bool  # config has a head_dim key (False: head_dim = hidden / heads)
    hidden_divisible_by_heads: bool  # the config class rejects hidden % heads != 0
    gguf_arch: str | None = "llama"  # llama.cpp's architecture name for this family (export.py); None: not written
    gated_mlp: bool = True
    # config flag that divides attention scores by (layer_idx + 1): renumbered layers must rescale their queries
    layer_index_scale_flag: str | None = None
    # config lists with one entry per layer (attention kind, RoPE or not): sliced with the kept layers
    per_layer_keys: tuple[str, ...] = ("layer_types",)
    # norms multiply by (norm_offset + weight): Gemma's RMSNorm stores weight - 1 (offset 1.0)
    norm_offset: float = 0.0
    # the input embedding is multiplied by sqrt(hidden_size) in forward (Gemma): pruning hidden changes it
    scaled_embedding: bool = False
    # config attribute of the final-logit soft-cap, cap * tanh(logits / cap) (Gemma 2); None: no cap
    logit_cap_key: str | None = None

    @property
    def moe(self) -> bool:
        """A mixture-of-experts family: its MLPs are routed experts (`keys` names "experts" and "top_k")."""
        return "experts" in self.keys

    def dims(self, config) -> Dims:
        """Read a config's shape; one line when it is impossible (a size below 1, heads not a multiple of the KV
        heads, experts fewer than each token's top-k)."""
        get = lambda field: getattr(config, self.keys[field], None) if field in self.keys else None  # noqa: E731
        sizes = {k: get(k) for k in ("hidden", "heads", "layers", "vocab")}
        bad = [f"{self.keys[k]}={v!r}" for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
        if bad:
            raise CompactLMError(f"{self.name} config: impossible {', '.join(bad)} (sizes are integers of at least 1)")
        hidden, heads = sizes["hidden"], sizes["heads"]
        ffn = get("ffn") or 4 * hidden  # GPT-2's n_inner=None means 4 * n_embd
        head_dim = (get("head_dim") if self.explicit_head_dim else None) or hidden // heads  # absent: hidden / heads
        kv_heads = get("kv_heads") or heads
        if self.moe and (getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1):
            raise CompactLMError(f"{self.name}: configs with dense MLP layers among the expert layers "
                                 "(mlp_only_layers, decoder_sparse_step > 1) are not supported")
        dims = Dims(hidden, ffn, heads, kv_heads, head_dim, sizes["layers"], sizes["vocab"], get("experts") or 0,
                    get("top_k") or 0)
        if not all(isinstance(v, int) and v >= 1 for v in (ffn, kv_heads, head_dim)) or heads % kv_heads:
            raise CompactLMError(f"{self.name} config: impossible shape: ffn {ffn}, {heads} heads in {kv_heads} KV "
                                 f"groups of head_dim {head_dim}")
        return dims

    def logit_cap(self, config) -> float | None:
        """The final-logit soft-cap of this config (Gemma 2), or None."""
        return getattr(config, self.logit_cap_key, None) if self.logit_cap_key else None

    def reads(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Per layer, the projections that read the residual stream: through the pre-attention norm (q/k/v,
        GPT-2's c_attn) and through the pre-MLP norm (gate/up, c_fc), as module paths in declaration order.
        They are the weights under the attention or MLP module with a "hidden" axis, other than the two output
        projections (which write the residual stream)."""
        attn, mlp = self.attn_out_path.rpartition(".")[0], self.mlp_out_path.rpartition(".")[0]
        found: dict[str, list[str]] = {attn: [], mlp: []}
        for suffix, axes in self.layer_params.items():
            path, _, leaf = suffix.rpartition(".")
            parent = path.rpartition(".")[0]
            if leaf == "weight" and parent in found and "hidden" in axes and path not in (
                    self.attn_out_path, self.mlp_out_path):
                found[parent].append(path)
        return tuple(found[attn]), tuple(found[mlp])

    def config_updates(self, dims: Dims) -> dict[str, int]:
        """Config attributes that describe `dims` (head_dim written explicitly where the family has it)."""
        out = {self.keys[f]: getattr(dims, f) for f in ("hidden", "ffn", "heads", "layers", "vocab")}
        if "kv_heads" in self.keys:
            out[self.keys["kv_heads"]] = dims.kv_heads
        if self.moe:
            out[self.keys["experts"]] = dims.experts
        if self.explicit_head_dim:
            out["head_dim"] = dims.head_dim
        return out

    def check(self, dims: Dims) -> None:
        """Raise a one-line error naming the constraint `dims` breaks for this family's config class."""
        if min(dims.hidden, dims.ffn, dims.heads, dims.kv_heads, dims.layers) < 1:
            raise CompactLMError(f"target {dims} has a size below 1")
        if self.moe and not dims.top_k <= dims.experts:
            raise CompactLMError(
                f"target.{self.keys['experts']}={dims.experts} is fewer than the {dims.top_k} experts each token is "
                f"routed to ({self.keys['top_k']})"
            )
        if dims.heads % dims.kv_heads:
            raise CompactLMError(
                f"target.num_attention_heads={dims.heads} is not a multiple of "
                f"target.num_key_value_heads={dims.kv_heads} (grouped-query attention)"
            )
        if not self.explicit_head_dim and dims.hidden != dims.heads * dims.head_dim:
            raise CompactLMError(
                f"{self.name} ties attention width to hidden size: target.hidden_size={dims.hidden} must equal "
                f"heads x head_dim = {dims.heads} x {dims.head_dim} = {dims.heads * dims.head_dim}"
            )
        if self.hidden_divisible_by_heads and dims.hidden % dims.heads:
            raise CompactLMError(
                f"{self.name} configs require hidden_size % num_attention_heads == 0: "
                f"target.hidden_size={dims.hidden} is not a multiple of target.num_attention_heads={dims.heads}"
            )


def _llama_like(name: str, model_types: tuple[str, ...], *, qk_norm: str | None = None,
                hidden_divisible_by_heads: bool, gguf_arch: str | None,
                norms: tuple[tuple[str, str | None], ...] = (("input_layernorm", "attn"),
                                                             ("post_attention_layernorm", "mlp")),
                explicit_head_dim: bool = True, fused: bool = False, experts: tuple[str, str] | None = None,
                **extra) -> Family:
    """Llama's layout and its relatives. `qk_norm`: "head" (one head_dim norm shared by the heads: Qwen3,
    Gemma 3) or "width" (a norm over the whole projection, heads x head_dim: OLMo 2, sliced with the heads).
    `norms`: (path, what reads its output) per layer. `fused`: Phi-3's qkv_proj and gate_up_proj.
    `experts`: a mixture of experts, (config key of the expert count, of each expert's width); transformers 5
    stores each layer's experts as two 3-D tensors, (experts, 2 x width, hidden) [gate | up] rows and
    (experts, hidden, width), beside a router (experts, hidden)."""
    if fused:
        attn = {"self_attn.qkv_proj.weight": ("qkv", "hidden"), "self_attn.qkv_proj.bias": ("qkv",)}
    else:
        attn = {
            "self_attn.q_proj.weight": ("q", "hidden"),
            "self_attn.q_proj.bias": ("q",),
            "self_attn.k_proj.weight": ("kv", "hidden"),
            "self_attn.k_proj.bias": ("kv",),
            "self_attn.v_proj.weight": ("kv", "hidden"),
            "self_attn.v_proj.bias": ("kv",),
        }
    attn |= {"self_attn.o_proj.weight": ("hidden", "q"), "self_attn.o_proj.bias": ("hidden",)}
    if qk_norm:
        q, kv = ("q", "kv") if qk_norm == "width" else (None, None)
        attn |= {"self_attn.q_norm.weight": (q,), "self_attn.k_norm.weight": (kv,)}
    down = {"mlp.down_proj.weight": ("hidden", "ffn"), "mlp.down_proj.bias": ("hidden",)}
    if experts:
        mlp = {"mlp.gate.weight": ("expert", "hidden"), "mlp.experts.gate_up_proj": ("expert", "effn2", "hidden"),
               "mlp.experts.down_proj": ("expert", "hidden", "effn")}
    elif fused:
        mlp = {"mlp.gate_up_proj.weight": ("ffn2", "hidden"), "mlp.gate_up_proj.bias": ("ffn2",)} | down
    else:
        mlp = {
            "mlp.gate_proj.weight": ("ffn", "hidden"),
            "mlp.gate_proj.bias": ("ffn",),
            "mlp.up_proj.weight": ("ffn", "hidden"),
            "mlp.up_proj.bias": ("ffn",),
        } | down
    norm_params = {f"{path}.weight": ("hidden",) for path, _ in norms}
    return Family(
        name=name,
        model_types=model_types,
        base_path="model",
        layers_path="model.layers",
        embed_path="model.embed_tokens",
        lm_head_path="lm_head",
        final_norm_path="model.norm",
        attn_out_path="self_attn.o_proj",
        mlp_out_path="mlp.experts" if experts else "mlp.down_proj",
        norm_paths=tuple(path for path, _ in norms),
        norm_reads=tuple(reads for _, reads in norms),
        layer_params=attn | mlp | norm_params,
        global_params={
            "model.embed_tokens.weight": (None, "hidden"),
            "model.norm.weight": ("hidden",),
            "lm_head.weight": (None, "hidden"),
        },
        keys={
            "hidden": "hidden_size",
            "ffn": "intermediate_size",
            "heads": "num_attention_heads",
            "kv_heads": "num_key_value_heads",
            "head_dim": "head_dim",
            "layers": "num_hidden_layers",
            "vocab": "vocab_size",
        } | ({"ffn": experts[1], "experts": experts[0], "top_k": "num_experts_per_tok"} if experts else {}),
        explicit_head_dim=explicit_head_dim,
        hidden_divisible_by_heads=hidden_divisible_by_heads,
        gguf_arch=gguf_arch,
        **extra,
    )


# Gemma 2 and 3 put a norm before and after both attention and MLP; each of the four scores hidden channels.
_SANDWICH = (("input_layernorm", "attn"), ("post_attention_layernorm", None),
             ("pre_feedforward_layernorm", "mlp"), ("post_feedforward_layernorm", None))
_GEMMA = dict(norms=_SANDWICH, norm_offset=1.0, scaled_embedding=True, hidden_divisible_by_heads=False, gguf_arch=None)

GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    base_path="transformer",
    layers_path="transformer.h",
    embed_path="transformer.wte",
    lm_head_path="lm_head",
    final_norm_path="transformer.ln_f",
    attn_out_path="attn.c_proj",
    mlp_out_path="mlp.c_proj",
    norm_paths=("ln_1", "ln_2"),
    norm_reads=("attn", "mlp"),
    # GPT-2 uses Conv1D: weights are stored (in_features, out_features), the transpose of nn.Linear.
    layer_params={
        "ln_1.weight": ("hidden",),
        "ln_1.bias": ("hidden",),
        "attn.c_attn.weight": ("hidden", "qkv"),
        "attn.c_attn.bias": ("qkv",),
        "attn.c_proj.weight": ("q", "hidden"),
        "attn.c_proj.bias": ("hidden",),
        "ln_2.weight": ("hidden",),
        "ln_2.bias": ("hidden",),
        "mlp.c_fc.weight": ("hidden", "ffn"),
        "mlp.c_fc.bias": ("ffn",),
        "mlp.c_proj.weight": ("ffn", "hidden"),
        "mlp.c_proj.bias": ("hidden",),
    },
    global_params={
        "transformer.wte.weight": (None, "hidden"),
        "transformer.wpe.weight": (None, "hidden"),
        "transformer.ln_f.weight": ("hidden",),
        "transformer.ln_f.bias": ("hidden",),
        "lm_head.weight": (None, "hidden"),
    },
    keys={"hidden": "n_embd", "ffn": "n_inner", "heads": "n_head", "layers": "n_layer", "vocab": "vocab_size"},
    explicit_head_dim=False,
    hidden_divisible_by_heads=True,
    gguf_arch="gpt2",
    gated_mlp=False,
    layer_index_scale_flag="scale_attn_by_inverse_layer_idx",
)

FAMILIES: tuple[Family, ...] = (
    _llama_like("llama", ("llama",), hidden_divisible_by_heads=True, gguf_arch="llama"),
    _llama_like("mistral", ("mistral",), hidden_divisible_by_heads=False, gguf_arch="llama"),
    _llama_like("qwen2", ("qwen2",), hidden_divisible_by_heads=False, gguf_arch="qwen2"),
    _llama_like("qwen3", ("qwen3",), qk_norm="head", hidden_divisible_by_heads=False, gguf_arch="qwen3"),
    # SmolLM3: Llama with layers that skip RoPE (no_rope_layers: 1 = RoPE, 0 = none), sliced with the layers
    _llama_like("smollm3", ("smollm3",), hidden_divisible_by_heads=False, gguf_arch=None,
                per_layer_keys=("layer_types", "no_rope_layers")),
    # Gemma 2: (1 + w) RMSNorms, sandwich norms, sqrt(hidden) embedding scale, soft-capped final logits (and
    # attention scores, inside the attention module), query_pre_attn_scalar (independent of head_dim)
    _llama_like("gemma2", ("gemma2",), logit_cap_key="final_logit_softcapping", **_GEMMA),
    _llama_like("gemma3", ("gemma3_text",), qk_norm="head", **(_GEMMA | {"gguf_arch": "gemma3"})),
    # Phi-3 / Phi-4-mini: fused [q; k; v] and [gate; up] rows; partial RoPE acts inside head_dim, never pruned
    _llama_like("phi3", ("phi3",), fused=True, hidden_divisible_by_heads=False, gguf_arch=None),
    # OLMo 2: norms after attention and MLP only (the projections read the raw residual stream), and q/k norms
    # over the whole projection width
    _llama_like("olmo2", ("olmo2",), qk_norm="width", hidden_divisible_by_heads=False, gguf_arch=None,
                norms=(("post_attention_layernorm", None), ("post_feedforward_layernorm", None))),
    # mixtures of experts: every layer's MLP is routed experts (softmax router, top-k per token; Qwen3-MoE
    # renormalises the top-k weights only with norm_topk_prob, Mixtral always); no shared expert
    _llama_like("qwen3_moe", ("qwen3_moe",), qk_norm="head", hidden_divisible_by_heads=False, gguf_arch=None,
                experts=("num_experts", "moe_intermediate_size")),
    _llama_like("mixtral", ("mixtral",), hidden_divisible_by_heads=False, gguf_arch=None,
                experts=("num_local_experts", "intermediate_size")),
    GPT2,
)


def family_of(model_or_config) -> Family:
    """The family record for a model or config; a one-line error lists the supported model types."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise CompactLMError(f"unsupported model family '{model_type}': compactlm supports {supported}")


def get_module(root, path: str):
    """Resolve a dotted path such as 'model.layers' (numeric parts index ModuleLists)."""
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root
