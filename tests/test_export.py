"""GGUF export: file structure per family and type, round trips through transformers' GGUF reader, RoPE row
permutation, pre-tokenizer names, tokenizer fields, the `compactlm export` command and interrupted exports."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from conftest import tiny_config
from gguf import GGUFReader
from transformers import AutoModelForCausalLM

from compactlm.cli import main
from compactlm.errors import CompactLMError
from compactlm.export import export_gguf, permute_rope, pre_tokenizer_name
from compactlm.models.family import family_of
from compactlm.models.loading import load_model

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
VOCAB = 320  # >= the 300 tokens of the tiny tokenizer: ids 300..319 are padding

# Max |logit difference| / max |logit| of a reloaded export against its source, on a tiny llama with every
# matrix quantised (no f16 fallback). Measured over 4 seeds on llama, qwen3 and gpt2: f16 1.9e-4..4.6e-4,
# bf16 1.5e-3..3.6e-3, q8_0 5.5e-3..1.25e-2. Each bound is ~4x the largest value seen.
F16_TOL = 2e-3
BF16_TOL = 1.5e-2
Q8_0_TOL = 5e-2
TOLERANCES = {"f16": F16_TOL, "bf16": BF16_TOL, "q8_0": Q8_0_TOL}


def make_model(family: str, tied: bool, *, head_dim: int = 12, ffn: int = 40, layers: int = 2, seed: int = 0):
    """A tiny random model shaped like a pruned one: head_dim != hidden / heads (not GPT-2, which ties them)
    and an ffn width that is not a multiple of 32; 1-D weights perturbed away from 1 and 0."""
    config = tiny_config(family, 4, 4 if family == "gpt2" else 2, tied, layers)
    config.vocab_size = VOCAB
    if family == "gpt2":
        config.n_inner = ffn
    else:
        config.head_dim, config.intermediate_size = head_dim, ffn
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def expected_shapes(model) -> dict[str, tuple[int, ...]]:
    """llama.cpp tensor name -> torch-order (out, in) shape, from the config alone (GPT-2 Conv1D transposed)."""
    config, family = model.config, family_of(model)
    d = family.dims(config)
    H, V, F = d.hidden, d.vocab, d.ffn
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    tied = config.tie_word_embeddings
    out = {"token_embd.weight": (V, H), "output_norm.weight": (H,)} | ({} if tied else {"output.weight": (V, H)})
    if family.name == "gpt2":
        out |= {"position_embd.weight": (config.n_positions, H), "output_norm.bias": (H,)}
        block = {"attn_norm.weight": (H,), "attn_norm.bias": (H,), "attn_qkv.weight": (3 * H, H),
                 "attn_qkv.bias": (3 * H,), "attn_output.weight": (H, H), "attn_output.bias": (H,),
                 "ffn_norm.weight": (H,), "ffn_norm.bias": (H,), "ffn_up.weight": (F, H), "ffn_up.bias": (F,),
                 "ffn_down.weight": (H, F), "ffn_down.bias": (H,)}
    else:
        block = {"attn_q.weight": (q, H), "attn_k.weight": (kv, H), "attn_v.weight": (kv, H),
                 "attn_output.weight": (H, q), "ffn_gate.weight": (F, H), "ffn_up.weight": (F, H),
                 "ffn_down.weight": (H, F), "attn_norm.weight": (H,), "ffn_norm.weight": (H,)}
        if family.name == "qwen2":
            block |= {"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)}
        if family.name == "qwen3":
            block |= {"attn_q_norm.weight": (d.head_dim,), "attn_k_norm.weight": (d.head_dim,)}
    for i in range(d.layers):
        out |= {f"blk.{i}.{name}": shape for name, shape in block.items()}
    return out


def fields(reader: GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def relative_logit_error(source, exported_file, ids) -> float:
    with torch.no_grad():
        want = source(ids).logits
        got = load_model(str(exported_file))(ids).logits
    return ((got - want).abs().max() / want.abs().max()).item()


def random_ids(seed: int = 1):
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


# -------------------------------------------------------------------------------------------- structure
STRUCTURE = [pytest.param(f, tied, "q8_0", id=f"{f}-{'tied' if tied else 'untied'}-q8_0")
             for f in FAMILIES for tied in (False, True)]
STRUCTURE += [pytest.param("llama", False, t, id=f"llama-untied-{t}") for t in ("f32", "f16", "bf16")]


@pytest.mark.parametrize("family,tied,type_name", STRUCTURE)
def test_file_structure(family, tied, type_name, bpe_tokenizer, tmp_path):
    model = make_model(family, tied)
    fam = family_of(model)
    d = fam.dims(model.config)
    result = export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf", type_name)
    assert result["gguf"] == str(tmp_path / "m.gguf") and result["type"] == type_name
    assert result["bytes"] == (tmp_path / "m.gguf").stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temp file left beside it

    reader = GGUFReader(tmp_path / "m.gguf")
    kv = fields(reader)
    arch = "llama" if family == "qwen2" else fam.gguf_arch  # llama.cpp's qwen2 needs heads x head_dim == hidden
    assert kv["general.architecture"] == arch
    assert kv[f"{arch}.block_count"] == d.layers == 2
    assert kv[f"{arch}.embedding_length"] == d.hidden
    assert kv[f"{arch}.feed_forward_length"] == d.ffn == 40
    assert kv[f"{arch}.attention.head_count"] == d.heads
    assert kv[f"{arch}.vocab_size"] == VOCAB
    if family == "gpt2":
        assert kv[f"{arch}.context_length"] == model.config.n_positions
    else:
        assert d.head_dim == 12 != d.hidden // d.heads
        assert kv[f"{arch}.attention.head_count_kv"] == d.kv_heads
        assert kv[f"{arch}.attention.key_length"] == kv[f"{arch}.attention.value_length"] == 12
        assert kv[f"{arch}.rope.dimension_count"] == 12
        assert kv[f"{arch}.context_length"] == model.config.max_position_embeddings

    want = expected_shapes(model)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(want)
    assert ("output.weight" in tensors) == (not tied)
    kept = []
    for name, t in tensors.items():
        assert [int(n) for n in t.shape] == list(reversed(want[name])), name  # GGUF: innermost dim first
        kind = t.tensor_type.name
        if len(want[name]) == 1 or type_name == "f32":
            assert kind == "F32", name
        elif type_name == "q8_0" and want[name][-1] % 32:
            assert kind == "F16", name
            kept.append(name)
        else:
            assert kind == type_name.upper(), name
    assert sorted(result["kept_f16"]) == sorted(kept)
    if type_name == "q8_0":  # in-features 48 (attention output, not GPT-2) and 40 (ffn_down) stay f16
        per_layer = ["ffn_down.weight"] + ([] if family == "gpt2" else ["attn_output.weight"])
        assert sorted(kept) == sorted(f"blk.{i}.{n}" for i in range(2) for n in per_layer)
    else:
        assert kept == []


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_f32_round_trip_is_exact(family, tied, bpe_tokenizer, tmp_path):
    """Tensor names, q/k permutation, Conv1D transposition, head_dim and norms all survive: same logits."""
    model = make_model(family, tied)
    export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf", "f32")
    loaded = load_model(str(tmp_path / "m.gguf"))
    d = family_of(model).dims(model.config)
    assert family_of(loaded).dims(loaded.config) == d
    ids = random_ids()
    with torch.no_grad():
        # the same float32 weights; only the norm eps comes back rounded to float32 and GPT-2's Conv1D weights as
        # transposed views: measured equal. Logits |x| < 1, so 1e-5 is ~100 ulps; a wrong permutation moves O(1)
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_reduced_precision_round_trips_within_tolerance(bpe_tokenizer, tmp_path):
    model = make_model("llama", False, head_dim=8, ffn=64)  # every matrix has rows of 32 or 64: all quantise
    ids = random_ids()
    errors = {}
    for type_name in ("f16", "bf16", "q8_0"):
        out = tmp_path / f"m-{type_name}.gguf"
        assert export_gguf(model, bpe_tokenizer, out, type_name)["kept_f16"] == []
        errors[type_name] = relative_logit_error(model, out, ids)
    for type_name, error in errors.items():
        assert error <= TOLERANCES[type_name], errors
    assert F16_TOL < BF16_TOL < Q8_0_TOL
    # each type really is that type: f16 beats bf16 (3 fewer mantissa bits), which beats q8_0 (8 bits a block)
    assert 0 < errors["f16"] < errors["bf16"] < errors["q8_0"], errors
    assert errors["q8_0"] > 5 * errors["f16"], errors


# ---------------------------------------------------------------------------------------- permute_rope
@pytest.mark.parametrize("heads,head_dim", [(1, 4), (4, 12), (2, 8)])
def test_permute_rope_interleaves_the_two_halves_of_each_head(heads, head_dim):
    w = torch.randn(heads * head_dim, 5)
    bias = torch.randn(heads * head_dim)
    for x in (w, bias):
        p = permute_rope(x, heads)
        assert p.shape == x.shape
        for h in range(heads):
            base = h * head_dim
            for j in range(head_dim // 2):
                assert torch.equal(p[base + 2 * j], x[base + j])
                assert torch.equal(p[base + 2 * j + 1], x[base + j + head_dim // 2])


def test_permuted_rows_under_interleaved_rope_give_hugging_face_attention_scores():
    """llama.cpp's RoPE rotates pairs (2j, 2j+1); Hugging Face's rotates (j, j + d/2). On permuted q/k rows the
    first gives the permuted result of the second, so every q.k score is unchanged."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    heads, head_dim, hidden, positions = 2, 8, 16, 6
    torch.manual_seed(0)
    wq, wk, x = torch.randn(heads * head_dim, hidden), torch.randn(heads * head_dim, hidden), torch.randn(positions, hidden)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.arange(positions).float()[:, None] * inv_freq  # (positions, head_dim / 2)
    emb = torch.cat([angles, angles], -1)
    split = lambda t: t.reshape(positions, heads, head_dim).transpose(0, 1)[None]  # noqa: E731  (1, heads, pos, d)
    q_hf, k_hf = apply_rotary_pos_emb(split(x @ wq.T), split(x @ wk.T), emb.cos()[None], emb.sin()[None])

    def interleaved(t):
        pairs = t.reshape(*t.shape[:-1], head_dim // 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        cos, sin = angles.cos(), angles.sin()
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)

    q_cpp = interleaved(split(x @ permute_rope(wq, heads).T))
    k_cpp = interleaved(split(x @ permute_rope(wk, heads).T))
    torch.testing.assert_close(q_cpp @ k_cpp.transpose(-1, -2), q_hf @ k_hf.transpose(-1, -2))
    assert not torch.allclose(interleaved(split(x @ wq.T)), q_cpp)  # without the permutation it differs by O(1)


# ----------------------------------------------------------------------------------------- pre-tokenizer
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Mistral NeMo's (Tekken) split, as its tokenizer.json writes it: single digits like Qwen2's, words split at case
TEKKEN_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer_spec(pre):
    """The `pre_tokenizer` entry of tokenizer.json as the tokenizers library writes it."""
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.BPE())
    if pre is not None:
        tok.pre_tokenizer = pre
    return json.loads(tok.to_str())["pre_tokenizer"]


def _split(regex: str):
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    return pt.Sequence([pt.Split(Regex(regex), behavior="isolated"), pt.ByteLevel(add_prefix_space=False,
                                                                                   use_regex=False)])


def _pre_tokenizer_cases():
    from tokenizers import pre_tokenizers as pt

    return [
        ("gpt-2", pt.ByteLevel(add_prefix_space=False)),
        ("smollm", pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)])),
        ("llama-bpe", _split(LLAMA3_REGEX)),
        ("qwen2", _split(QWEN2_REGEX)),
        ("tekken", _split(TEKKEN_REGEX)),  # was written as qwen2: llama.cpp then split camelCase differently
        ("default", pt.Whitespace()),
        ("default", pt.ByteLevel(use_regex=False)),  # no split at all: not GPT-2's
        ("default", pt.Sequence([pt.Digits(individual_digits=False), pt.ByteLevel()])),
        ("default", _split(r"\s+")),
        ("default", None),
    ]


@pytest.mark.parametrize("case", range(10))
def test_pre_tokenizer_name(case):
    want, pre = _pre_tokenizer_cases()[case]
    assert pre_tokenizer_name(_pre_tokenizer_spec(pre)) == want


# ------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_fields(bpe_tokenizer, tmp_path):
    export_gguf(make_model("qwen2", True), bpe_tokenizer, tmp_path / "m.gguf", "f16")
    kv = fields(GGUFReader(tmp_path / "m.gguf"))
    by_id = {i: t for t, i in bpe_tokenizer.get_vocab().items()}
    n = len(bpe_tokenizer)
    assert n == 300 < VOCAB
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert kv["tokenizer.ggml.tokens"] == [by_id[i] for i in range(n)] + [f"[PAD{i}]" for i in range(n, VOCAB)]
    types = kv["tokenizer.ggml.token_type"]
    eos = bpe_tokenizer.eos_token_id
    assert types[eos] == gguf.TokenType.CONTROL  # <eos>: a special added token
    assert [t for i, t in enumerate(types[:n]) if i != eos] == [gguf.TokenType.NORMAL] * (n - 1)
    assert types[n:] == [gguf.TokenType.UNUSED] * (VOCAB - n)
    bpe_tokenizer.save_pretrained(tmp_path / "tok")
    merges = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["model"]["merges"]
    assert len(kv["tokenizer.ggml.merges"]) == len(merges) > 0
    assert kv["tokenizer.ggml.eos_token_id"] == eos
    assert kv["tokenizer.ggml.add_bos_token"] is False and kv["tokenizer.ggml.add_eos_token"] is False


def test_non_bpe_tokenizer_is_refused_and_nothing_written(word_tokenizer, tmp_path):
    out = tmp_path / "sub" / "m.gguf"
    with pytest.raises(CompactLMError, match="byte-level BPE"):
        export_gguf(make_model("llama", False), word_tokenizer, out, "f16")
    assert list(tmp_path.iterdir()) == []  # neither the file, a temp file nor the folder made for it


def test_tokenizer_larger_than_the_embedding_is_refused(bpe_tokenizer, tmp_path):
    model = make_model("llama", False)
    model.resize_token_embeddings(64)
    with pytest.raises(CompactLMError, match="only 64 embeddings"):
        export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


def test_unknown_type_is_refused(bpe_tokenizer, tmp_path):
    with pytest.raises(CompactLMError, match="is not one of f32, f16, bf16, q8_0"):
        export_gguf(make_model("llama", False), bpe_tokenizer, tmp_path / "m.gguf", "q4_0")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_export_writes_a_file_that_loads_back(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", f"model={tiny_checkpoint}", f"out={out}", "export.type=q8_0"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["gguf"] == str(out) and result["type"] == "q8_0" and result["bytes"] == out.stat().st_size
    assert result["kept_f16"] == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight", "blk.2.ffn_down.weight"]
    assert fields(GGUFReader(out))["general.name"] == tiny_checkpoint.name
    source = load_model(str(tiny_checkpoint))
    ids = torch.randint(0, source.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    assert relative_logit_error(source, out, ids) <= Q8_0_TOL

    default = tmp_path / "default.gguf"  # export.type unset: f16
    assert main(["export", f"model={tiny_checkpoint}", f"out={default}"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["type"] == "f16"
    assert {t.tensor_type.name for t in GGUFReader(default).tensors} == {"F16", "F32"}


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_interrupted_export_leaves_nothing_behind(interrupt, tiny_checkpoint, bpe_tokenizer, tmp_path, capsys,
                                                  monkeypatch):
    def write_tensors_to_file(self, *args, **kwargs):
        raise interrupt("stopped while writing tensors")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", write_tensors_to_file)
    out = tmp_path / "m.gguf"
    if interrupt is KeyboardInterrupt:  # Ctrl-C through the command
        assert main(["export", f"model={tiny_checkpoint}", f"out={out}"]) == 130
        assert "interrupted" in capsys.readouterr().err
        assert list(tmp_path.iterdir()) == []
    else:  # a failure while an earlier export is in place: that one stays as it was
        out.write_bytes(b"previous export")
        with pytest.raises(RuntimeError, match="stopped"):
            export_gguf(make_model("gpt2", False), bpe_tokenizer, out, "f16")
        assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"] and out.read_bytes() == b"previous export"


def test_qwen2_architecture_follows_its_head_layout(bpe_tokenizer, tmp_path):
    """llama.cpp's qwen2 assumes heads x head_dim == hidden: a Qwen2 that keeps it stays qwen2 with its q rows as
    they are (NeoX RoPE), a pruned one is written as llama with permuted rows and loads back with its biases."""
    for head_dim, arch in ((8, "qwen2"), (12, "llama")):
        model = make_model("qwen2", tied=False, head_dim=head_dim)
        export_gguf(model, bpe_tokenizer, tmp_path / f"{arch}.gguf", "f32")
        reader = GGUFReader(tmp_path / f"{arch}.gguf")
        assert fields(reader)["general.architecture"] == arch
        q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.bias")
        source = model.model.layers[0].self_attn.q_proj.bias.detach()
        want = source if arch == "qwen2" else permute_rope(source, 4)
        assert torch.equal(torch.from_numpy(q.data.copy()), want)
        reloaded = load_model(str(tmp_path / f"{arch}.gguf"))
        ids = torch.arange(5, 21).unsqueeze(0)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)  # as f32 above


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
], ids=["linear", "llama3", "dynamic"])
def test_rope_scaling(rope, bpe_tokenizer, tmp_path):
    """Linear scaling is two keys; Llama 3's is llama.cpp's rope_freqs tensor (1 for high frequencies, the factor
    for low ones, transformers' own numbers); a kind with no GGUF equivalent is refused."""
    model = make_model("llama", tied=True, head_dim=16)
    model.config.rope_parameters = rope
    if rope["rope_type"] == "dynamic":
        with pytest.raises(CompactLMError, match="RoPE scaling 'dynamic'"):
            export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf", "f32")
        assert not list(tmp_path.iterdir())
        return
    export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf", "f32")
    reader = GGUFReader(tmp_path / "m.gguf")
    kv = fields(reader)
    assert kv["llama.rope.freq_base"] == rope["rope_theta"]
    freqs = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    if rope["rope_type"] == "linear":
        assert kv["llama.rope.scaling.type"] == "linear" and kv["llama.rope.scaling.factor"] == 2.0 and not freqs
    else:
        values = torch.from_numpy(freqs[0].data.copy())
        # float64 default frequencies over transformers' float32 scaled ones: the factors within a float32
        # rounding (6e-8 relative) of 1 and 8; measured exact
        assert values.shape == (8,) and values[0] == 1.0 and torch.allclose(values[-1], torch.tensor(8.0))
        assert bool(((values >= 1.0 - 1e-6) & (values <= 8.0 + 1e-5)).all())


@pytest.mark.parametrize("family", ["gemma2", "phi3", "olmo2", "smollm3"])
def test_families_without_a_gguf_writer_are_refused_before_writing(family, tmp_path):
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    with pytest.raises(CompactLMError, match=f"not yet for {family}"):
        export_gguf(model, None, tmp_path / "out" / "model.gguf", "f16")
    assert not (tmp_path / "out").exists()


def test_a_per_layer_llama_is_written_as_llama_cpps_deci(bpe_tokenizer, tmp_path):
    """Per-layer widths (prune.per_layer) go to llama.cpp's deci architecture: head, KV-head and MLP-width
    arrays, one value per layer, and each layer's tensors in their own shapes (q and k permuted for RoPE with
    that layer's heads). A family deci cannot hold is refused in one line, with no file left."""
    from conftest import per_layer_plan_of

    from compactlm.models.layer_shapes import layer_records
    from compactlm.pruning import prune_model

    config = tiny_config("llama", 4, 2)
    config.vocab_size = len(bpe_tokenizer)
    torch.manual_seed(0)
    source = AutoModelForCausalLM.from_config(config).eval()
    model = prune_model(source, per_layer_plan_of(source)[3])
    records = layer_records(model.config)
    path = tmp_path / "m.gguf"
    export_gguf(model, bpe_tokenizer, path, "f32")
    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    assert fields["general.architecture"] == "deci"
    assert fields["deci.feed_forward_length"] == [r["ffn"] for r in records]
    assert fields["deci.attention.head_count"] == [r["heads"] for r in records]
    assert fields["deci.attention.head_count_kv"] == [r["kv_heads"] for r in records]
    tensors = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}  # GGUF lists dims reversed
    head_dim = model.config.head_dim
    for i, r in enumerate(records):
        assert tensors[f"blk.{i}.ffn_up.weight"] == (r["ffn"], config.hidden_size)
        assert tensors[f"blk.{i}.attn_k.weight"] == (r["kv_heads"] * head_dim, config.hidden_size)
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    want = permute_rope(model.model.layers[0].self_attn.q_proj.weight.detach(), records[0]["heads"])
    assert torch.equal(torch.from_numpy(q.data.copy()).reshape(want.shape), want)

    qwen3 = tiny_config("qwen3", 4, 2)
    qwen3 = AutoModelForCausalLM.from_config(qwen3).eval()
    with pytest.raises(CompactLMError, match="deci"):
        export_gguf(prune_model(qwen3, per_layer_plan_of(qwen3)[3]), bpe_tokenizer, tmp_path / "q.gguf", "f32")
    assert not (tmp_path / "q.gguf").exists()
