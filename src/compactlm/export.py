"""GGUF export: a checkpoint of any supported family as one .gguf file that llama.cpp runs.

    compactlm export model=DIR out=FILE.gguf [export.type=f32|f16|bf16|q8_0]

Keys and tensor names are llama.cpp's, written with the `gguf` package (its writer, its name map, its
quantiser). What pruned shapes need, and what each family needs:

- `attention.key_length` / `value_length` always carry head_dim, so a pruned model whose head_dim is not
  hidden / heads loads with its true head size (and `rope.dimension_count`: RoPE spans the whole head).
- Llama-arch families (Llama, Mistral, SmolLM) have their q/k rows permuted from Hugging Face's half-split
  RoPE layout to llama.cpp's interleaved one; Qwen2/Qwen3 use llama.cpp's NeoX RoPE and need no permutation.
  llama.cpp's qwen2 (unlike qwen3 and llama) assumes heads x head_dim == hidden: a Qwen2 pruned otherwise is
  written as llama, the same computation (`gguf_arch`).
- GPT-2's Conv1D weights are stored (in, out): they are transposed to the (out, in) of every other family.
- q8_0 quantises in blocks of 32 along a row: a matrix whose rows are not a multiple of 32 long (an odd
  pruned ffn width) stays f16, as in llama.cpp's own converter, and the result lists it. 1-D tensors (norms,
  biases) stay f32 at every type.
- Gemma 3 (llama.cpp's gemma3): its norms store w where the model computes (1 + w); llama.cpp reads the gain
  itself, so 1 is added, as llama.cpp's converter does. llama.cpp fixes what the file cannot say: every sixth
  layer global (the rest sliding-window), the local RoPE base 10,000 and 1/sqrt(head_dim) attention scaling; a
  model that differs (layers dropped out of that pattern) is refused in one line.
- Tokenizers: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) is written with its merges, the pre-tokenizer's name
  read off its split rules. A SentencePiece-style BPE (byte fallback, spaces as U+2581: Gemma, Llama 2) is
  written as llama.cpp's `llama` model: tokens, types (byte, control, user-defined) and scores that rank the
  merges as the tokenizer's merge list does. Special tokens, add_bos/eos and the chat template in both.

The file is written beside `out` and renamed into place, so an interrupted export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from compactlm.errors import CompactLMError
from compactlm.files import as_if_created
from compactlm.models.family import FAMILIES, Family, family_of
from compactlm.models.layer_shapes import layer_records
from compactlm.models.loading import check_finite

log = logging.getLogger(__name__)

TYPES = ("f32", "f16", "bf16", "q8_0")
Q8_BLOCK = 32


def _qtype(name: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[name]


def _file_type(name: str):
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[name]


# ---------------------------------------------------------------------------------------------- tensors
def permute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rotate-half row order (per head: all real parts, then all imaginary parts) to llama.cpp's
    interleaved pairs, for the rows of q_proj/k_proj (weight or bias) of `heads` heads."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_arch(family: Family, config) -> str:
    """llama.cpp's architecture for this model: the family's, except a Qwen2 whose heads x head_dim is not its
    hidden size (pruned heads). llama.cpp's qwen2 requires them equal; Qwen2 is Llama with q/k/v biases and
    NeoX RoPE, so it is written as llama (RoPE rows permuted, biases kept), which takes any head_dim."""
    if family.gguf_arch is None:
        supported = ", ".join(f.name for f in FAMILIES if f.gguf_arch)
        raise CompactLMError(f"export: GGUF is written for {supported}, not yet for {family.name}; the Hugging Face "
                             "checkpoint loads with transformers and converts with llama.cpp's convert_hf_to_gguf.py")
    if layer_records(config):  # per-layer widths: llama.cpp's deci (Llama with per-layer head and MLP arrays)
        if family.gguf_arch != "llama" or getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise CompactLMError(f"export: this model's layers differ in width (prune.per_layer); GGUF holds that "
                                 f"as llama.cpp's deci architecture, written for Llama-architecture families without "
                                 f"biases, not for {family.name}")
        return "deci"
    d = family.dims(config)
    if family.gguf_arch == "qwen2" and d.heads * d.head_dim != d.hidden:
        log.warning("export: llama.cpp's qwen2 needs heads x head_dim == hidden (%d x %d != %d): written as llama",
                    d.heads, d.head_dim, d.hidden)
        return "llama"
    return family.gguf_arch


def gguf_tensors(model, family: Family, arch: str):
    """(llama.cpp name, float32 array) for every parameter of `model` in architecture `arch`, tied weights once."""
    import gguf
    from transformers.pytorch_utils import Conv1D

    d = family.dims(model.config)
    names = gguf.get_tensor_name_map(_arch(arch), d.layers)
    records = layer_records(model.config) or [{"heads": d.heads, "kv_heads": d.kv_heads}] * d.layers
    conv1d = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}
    for name, p in model.named_parameters():  # a tied lm_head is not listed again: llama.cpp reuses token_embd
        w = p.detach().float().cpu()
        if name in conv1d:
            w = w.T
        if family.norm_offset and name.endswith("norm.weight"):  # Gemma: the stored w of a (offset + w) gain
            w = w + family.norm_offset
        if arch in ("llama", "deci") and ".self_attn.q_proj." in name:
            w = permute_rope(w, records[_layer_index(name)]["heads"])
        elif arch in ("llama", "deci") and ".self_attn.k_proj." in name:
            w = permute_rope(w, records[_layer_index(name)]["kv_heads"])
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise CompactLMError(f"export: no llama.cpp name for tensor {name} of a {family.name} model")
        yield new, w.contiguous().numpy()


def encode(array: np.ndarray, type_name: str) -> tuple[np.ndarray, str]:
    """`array` in the export type (1-D tensors stay f32; q8_0 falls back to f16 for rows not a multiple of 32):
    (data for the writer, the type it has)."""
    import gguf

    if array.ndim == 1 or type_name == "f32":
        type_name = "f32"
    elif type_name == "q8_0" and array.shape[-1] % Q8_BLOCK:
        type_name = "f16"
    return gguf.quants.quantize(array, _qtype(type_name)), type_name


# -------------------------------------------------------------------------------------------- metadata
def _arch(name: str):
    import gguf

    return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == name)


def rope_parameters(config) -> dict:
    """RoPE settings as transformers 5 keeps them (`rope_parameters`), or from older configs' fields."""
    params = getattr(config, "rope_parameters", None)
    if params and "full_attention" in params:  # per attention kind (Gemma 3): the global layers' settings
        return dict(params["full_attention"])
    if params:
        return dict(params)
    return {"rope_theta": getattr(config, "rope_theta", 10000.0), **(getattr(config, "rope_scaling", None) or {})}


def llama3_rope_factors(config) -> np.ndarray:
    """llama.cpp's `rope_freqs` for Llama 3 scaling: the default inverse frequencies over the scaled ones, as
    transformers computes both."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim = family_of(config).dims(config).head_dim
    theta = rope_parameters(config)["rope_theta"]
    default = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (default / scaled.double()).float().numpy()


GEMMA3_GLOBAL_EVERY = 6  # llama.cpp's gemma3: layers 5, 11, 17, ... attend globally, the others in a window
GEMMA3_LOCAL_THETA = 10_000.0  # llama.cpp's gemma3: the sliding-window layers' RoPE base


def check_gemma3(config, d) -> None:
    """What llama.cpp's gemma3 assumes and a GGUF cannot say: a one-line error when this model differs."""
    want = ["full_attention" if (i + 1) % GEMMA3_GLOBAL_EVERY == 0 else "sliding_attention" for i in range(d.layers)]
    if list(getattr(config, "layer_types", want)) != want:
        raise CompactLMError(f"export: llama.cpp's gemma3 makes every {GEMMA3_GLOBAL_EVERY}th layer global; this model's "
                             "layer_types differ (layers were dropped): it loads with transformers, not llama.cpp")
    local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention", {})
    if local and (local.get("rope_theta") != GEMMA3_LOCAL_THETA or local.get("rope_type", "default") != "default"):
        raise CompactLMError(f"export: llama.cpp's gemma3 uses RoPE base {GEMMA3_LOCAL_THETA:g} in sliding-window "
                             f"layers; this model has {local}")
    if getattr(config, "query_pre_attn_scalar", d.head_dim) != d.head_dim:
        raise CompactLMError(f"export: llama.cpp's gemma3 scales attention by 1/sqrt(head_dim); this model's "
                             f"query_pre_attn_scalar is {config.query_pre_attn_scalar}, head_dim {d.head_dim}")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(config, key, None):
            raise CompactLMError(f"export: llama.cpp's gemma3 has no {key}; this model sets it")


def _layer_index(name: str) -> int:
    """The layer of a parameter name (`model.layers.<i>.`...)."""
    return int(re.search(r"\.layers\.(\d+)\.", name).group(1))


def write_hparams(writer, family: Family, config, arch: str) -> list[tuple[str, np.ndarray]]:
    """The architecture's keys; returns extra tensors the settings need (Llama 3's rope_freqs)."""
    import gguf

    d = family.dims(config)
    writer.add_context_length(getattr(config, "max_position_embeddings", None) or config.n_positions)
    writer.add_embedding_length(d.hidden)
    writer.add_block_count(d.layers)
    records = layer_records(config)  # deci: one value per layer
    each = lambda key, uniform: [r[key] for r in records] if records else uniform  # noqa: E731
    writer.add_feed_forward_length(each("ffn", d.ffn))
    writer.add_head_count(each("heads", d.heads))
    writer.add_vocab_size(d.vocab)
    if arch == "gpt2":
        if getattr(config, family.layer_index_scale_flag, False) or getattr(config, "reorder_and_upcast_attn", False):
            raise CompactLMError("export: llama.cpp's gpt2 has no scale_attn_by_inverse_layer_idx or "
                                 "reorder_and_upcast_attn; this GPT-2 config sets one")
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return []
    if arch == "gemma3":
        check_gemma3(config, d)
        writer.add_sliding_window(config.sliding_window)
    writer.add_head_count_kv(each("kv_heads", d.kv_heads))
    writer.add_key_length(d.head_dim)
    writer.add_value_length(d.head_dim)
    writer.add_rope_dimension_count(d.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind == "llama3":
        return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config))]
    elif kind != "default":
        raise CompactLMError(f"export: RoPE scaling '{kind}' has no GGUF equivalent here (default, linear, yarn, llama3)")
    return []


# ------------------------------------------------------------------------------------------- tokenizer
# llama.cpp's pre-tokenizer names, recognised from the rules in tokenizer.json (llama.cpp itself hashes the
# tokens of a test string; the rules are what that hash stands for).
LLAMA3_DIGITS, QWEN2_DIGITS = r"\p{N}{1,3}", r"|\p{N}|"
# Tekken (Mistral NeMo) splits words at case changes; it shares Qwen2's single digits, so it is tested first
TEKKEN_CASE_SPLIT = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"


def pre_tokenizer_name(spec: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json `pre_tokenizer`: gpt-2 (plain byte level), smollm (single digits,
    then byte level), llama-bpe (Llama 3's split), tekken (Mistral NeMo's case-aware split), qwen2 (Qwen2's
    split); anything else is "default"."""
    parts = (spec or {}).get("pretokenizers", [spec] if spec else [])
    kinds = [p.get("type") for p in parts]
    splits = [p["pattern"].get("Regex", "") for p in parts if p.get("type") == "Split"]
    if splits and LLAMA3_DIGITS in splits[0]:
        return "llama-bpe"
    if splits and TEKKEN_CASE_SPLIT in splits[0]:
        return "tekken"
    if splits and QWEN2_DIGITS in splits[0]:
        return "qwen2"
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    log.warning("export: pre-tokenizer %s is not one llama.cpp names; writing 'default' (GPT-2's split)", kinds)
    return "default"


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp types (normal, control for special added tokens, user-defined for
    other added ones, unused for ids the tokenizer does not know: a vocabulary padded by the model)."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise CompactLMError(f"export: the tokenizer has token id {max(by_id)} but the model only {vocab_size} embeddings")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    return tokens, types


SPM_SPACE = "\u2581"  # SentencePiece's visible space
SPM_CONTROL_SCORE = -1000.0  # what llama.cpp's converters give control and user-defined tokens (never merged)
BYTE_TOKEN = re.compile(r"^<0x[0-9A-F]{2}>$")  # a byte-fallback token


def sentencepiece_vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[float]]:
    """Tokens, llama.cpp types and scores of a SentencePiece-style BPE: byte-fallback tokens are BYTE; a normal
    token scores minus its id, since llama.cpp merges the pair whose result scores highest and such a
    tokenizer's merges rank by the id of what they make (transformers rebuilds Gemma's merges that way)."""
    import gguf

    tokens, types = vocabulary(tokenizer, vocab_size)
    scores = []
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind == gguf.TokenType.NORMAL and BYTE_TOKEN.match(token):
            types[i], score = gguf.TokenType.BYTE, 0.0
        else:
            score = -float(i) if kind == gguf.TokenType.NORMAL else SPM_CONTROL_SCORE
        scores.append(score)
    return tokens, types, scores


def write_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Vocabulary, merges or scores, special token ids, add_bos/eos and chat template of a byte-level BPE or a
    SentencePiece-style BPE tokenizer."""
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)  # one layout whatever the source (HF folder, GGUF, built-in)
        path = Path(tmp) / "tokenizer.json"
        spec = json.loads(path.read_text()) if path.is_file() else {}
        model = spec.get("model", {})
        if model.get("type") == "BPE" and model.get("byte_fallback"):
            tokens, types, scores = sentencepiece_vocabulary(tokenizer, vocab_size)
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(tokens)
            writer.add_token_scores(scores)
            writer.add_token_types(types)
            writer.add_add_space_prefix(tokenizer.tokenize("a")[0].startswith(SPM_SPACE))
            merges = False  # llama.cpp's sentencepiece model merges by score
        elif model.get("type") == "BPE" and "ByteLevel" in json.dumps(spec.get("decoder")):
            tokens, types = vocabulary(tokenizer, vocab_size)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(pre_tokenizer_name(spec.get("pre_tokenizer")))
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            merges = True
        else:
            raise CompactLMError("export: the tokenizer is neither byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) nor "
                                 "SentencePiece-style BPE (Gemma, Llama 2); unigram and WordPiece are not supported")
        special = gguf.SpecialVocab(tmp, load_merges=merges, n_vocab=len(tokens))
        # what the tokenizer does, stated, so that llama.cpp does not fall back to its own default (BOS on)
        ids = tokenizer("a")["input_ids"]
        special.add_special_token = {"bos": tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id,
                                     "eos": tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id}
        special.add_to_gguf(writer, quiet=True)


# ---------------------------------------------------------------------------------------------- export
def export_gguf(model, tokenizer, out: str | Path, type_name: str = "f16", name: str | None = None) -> dict:
    """Write `model` (any supported family) and its tokenizer to `out` as GGUF; returns what was written."""
    import gguf

    if type_name not in TYPES:
        raise CompactLMError(f"export.type={type_name!r} is not one of {', '.join(TYPES)}")
    family = family_of(model)
    arch = gguf_arch(family, model.config)
    check_finite(model.state_dict().items(), f"export of {getattr(model, 'name_or_path', 'the model')}")
    out = Path(out)
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    as_if_created(tmp)
    kept_f16: list[str] = []
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or out.stem)
        writer.add_file_type(_file_type(type_name))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        extra = write_hparams(writer, family, model.config, arch)
        write_tokenizer(writer, tokenizer, family.dims(model.config).vocab)
        for tensor_name, array in [*gguf_tensors(model, family, arch), *extra]:
            data, got = encode(array, type_name)
            if got != type_name and array.ndim > 1:
                kept_f16.append(tensor_name)
            writer.add_tensor(tensor_name, data, raw_dtype=_qtype(got))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)
        writer.close()
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):  # the export failed: remove what it wrote, and the folders it made for `out`
            os.unlink(tmp)
            for folder in made:
                with contextlib.suppress(OSError):
                    folder.rmdir()
    if kept_f16:
        log.info("export: %d tensors have rows not a multiple of %d and stay f16 (%s, ...)",
                 len(kept_f16), Q8_BLOCK, kept_f16[0])
    return {"gguf": str(out), "type": type_name, "bytes": out.stat().st_size, "kept_f16": kept_f16}
