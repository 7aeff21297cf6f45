"""The one tiny-model factory: every family, several (heads, kv_heads) layouts, tied and untied heads."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# token stores of the tests' throwaway data go to a temp folder (subprocesses inherit it), not the user's cache
os.environ["COMPACTLM_TOKENS"] = tempfile.mkdtemp(prefix="compactlm-test-tokens-")

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma2", "gemma3", "phi3", "olmo2", "qwen3_moe",
            "mixtral", "gpt2")
MOE = ("qwen3_moe", "mixtral")
LAYOUTS = ((4, 4), (4, 2), (4, 1))
CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
           "smollm3": "SmolLM3Config", "gemma2": "Gemma2Config", "gemma3": "Gemma3TextConfig", "phi3": "Phi3Config",
           "olmo2": "Olmo2Config", "qwen3_moe": "Qwen3MoeConfig", "mixtral": "MixtralConfig"}
VOCAB = 64


def tiny_config(family: str, heads: int = 4, kv_heads: int = 2, tied: bool = False, layers: int = 3):
    """A tiny random config of `family`: hidden 32, head_dim 8, ffn 48, `layers` layers; the mixtures of experts
    have 4 experts of width 24 (Mixtral 48: its intermediate_size is the experts' width), 2 per token."""
    import transformers

    head_dim, hidden = 8, 32
    if family == "gpt2":
        # GPT-2 has no GQA and ties attention width to hidden: hidden = heads * head_dim.
        return transformers.GPT2Config(
            n_embd=heads * head_dim, n_head=heads, n_layer=layers, n_inner=48, vocab_size=VOCAB,
            n_positions=128, tie_word_embeddings=tied, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    cls = getattr(transformers, CONFIGS[family])
    # sliding and full layers in turn, with a window shorter than the test batches so that both kinds differ
    sliding = {"layer_types": [("sliding_attention", "full_attention")[i % 2] for i in range(layers)], "sliding_window": 4}
    extra = {
        "gemma2": sliding,
        "gemma3": sliding,
        "smollm3": {"no_rope_layers": [1 - i % 2 for i in range(layers)]},  # every other layer without RoPE
        "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24},
        "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    }.get(family, {})
    return cls(
        hidden_size=hidden, intermediate_size=48, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, num_hidden_layers=layers, vocab_size=VOCAB, max_position_embeddings=128,
        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1, pad_token_id=1, **extra,
    )


def tiny_model(family: str, heads: int = 4, kv_heads: int = 2, tied: bool = False, layers: int = 3, seed: int = 0):
    """A tiny random model in eval mode, float32, with non-trivial norm weights and biases."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, heads, kv_heads, tied, layers))
    with torch.no_grad():  # norms start at exactly 1 and biases at 0: perturb them so slicing errors show
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def model_params():
    """(family, heads, kv_heads, tied) for every family and layout; GPT-2 only has heads == kv_heads."""
    out = []
    for family in FAMILIES:
        for heads, kv in LAYOUTS:
            if family == "gpt2" and kv != heads:
                continue
            for tied in (False, True):
                out.append(pytest.param(family, heads, kv, tied, id=f"{family}-{heads}x{kv}-{'tied' if tied else 'untied'}"))
    return out


def positive_scores(model, layer_metrics: tuple[str, ...] = ("x",), seed: int = 0):
    """Random positive scores (1 + U[0, 1)) of the model's shapes and the named layer metrics; a mixture of
    experts gets its neurons per expert and a "reap_sum" expert metric (the default)."""
    from compactlm.importance.scores import Scores
    from compactlm.models.family import family_of

    dims = family_of(model).dims(model.config)
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: 1.0 + torch.rand(*shape, generator=g)  # noqa: E731
    experts = {"reap_sum": rand(dims.layers, dims.experts)} if dims.experts else {}
    ffn = rand(dims.layers, *((dims.experts,) if dims.experts else ()), dims.ffn)
    return Scores(rand(dims.hidden), rand(dims.layers, dims.heads), ffn, {m: rand(dims.layers) for m in layer_metrics},
                  experts=experts)


def ffn_key(family) -> str:
    """The target key of the MLP width: intermediate_size, or Qwen3-MoE's moe_intermediate_size."""
    from compactlm.pruning.targets import target_keys

    return next(key for key, field in target_keys(family).items() if field == "ffn")


@pytest.fixture
def token_batch():
    """A (3, 16) batch of token ids with an attention mask that pads the tail of two rows."""
    torch.manual_seed(1)
    ids = torch.randint(2, VOCAB, (3, 16))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    mask[2, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def corpus_text(chars: int) -> str:
    """The first `chars` characters of the built-in python-docs corpus (part of the project: nothing to fetch)."""
    from compactlm import data

    return "\n\n".join(data.load_texts("python-docs", max_chars=chars))


def tiny_tokenizer(vocab_size: int = 300, split: str | None = None):
    """An offline byte-level BPE tokenizer (any text encodes) trained on a slice of the python-docs corpus;
    `split`: a regex applied before the byte-level step (as Llama 3, Qwen2 and Tekken tokenizers do)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = corpus_text(50_000)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """`tiny_tokenizer()` once per session: byte-level BPE, any text encodes, eos <eos>."""
    return tiny_tokenizer()


WORDS = ["the", "king", "queen", "speaks", "of", "love", "and", "war", "to", "his", "her", "people"]


@pytest.fixture(scope="session")
def word_tokenizer():
    """A word-level tokenizer whose ids fit the tiny models' VOCAB: 0 <unk>, 1 </s> (eos and pad), then WORDS."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1} | {w: i + 2 for i, w in enumerate(WORDS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="</s>")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, bpe_tokenizer):
    """A tiny random Llama (4 heads in 2 KV groups) with a real tokenizer, saved as a HF checkpoint dir."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = bpe_tokenizer
    config = tiny_config("llama", 4, 2, tied=True)
    config.vocab_size, config.eos_token_id, config.pad_token_id, config.bos_token_id = len(tok), 0, 0, 0
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A 60 KB slice of the python-docs corpus as a .txt file."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(corpus_text(60_000))
    return path


def assert_column_close(got: list[dict], want: list[dict], key: str, rel: float) -> None:
    """Rows of two metrics logs carry `key` at the same steps, with values equal within `rel`."""
    # `rel` is the caller's: each call site says why its runs may differ by that much
    assert [key in r for r in got] == [key in r for r in want], key
    assert [r[key] for r in got if key in r] == pytest.approx([r[key] for r in want if key in r], rel=rel), key


KILL_AFTER_CHECKPOINT = """
import os, signal, sys
from compactlm.distill import checkpoint as ckpt
real_save = ckpt.save
def save(out_dir, state, progress):
    path = real_save(out_dir, state, progress)
    if progress.step == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)  # as a power cut would: no cleanup, no finally blocks
    return path
ckpt.save = save
from compactlm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_killed_at_checkpoint(args: list[str], step: int, log) -> int:
    """Run `compactlm *args` in a subprocess that SIGKILLs itself right after writing the checkpoint of
    `step`: a deterministic interruption, no polling. Returns the exit code (-SIGKILL when it was killed)."""
    import subprocess
    import sys

    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    env = os.environ | {"KILL_AT_STEP": str(step), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as err:
        return subprocess.run([sys.executable, "-c", KILL_AFTER_CHECKPOINT, *args], env=env,
                              stdout=subprocess.DEVNULL, stderr=err).returncode


def per_layer_plan_of(model, ffn_fraction=0.5, heads=2, seed=0):
    """(family, source dims, uniform target, per-layer plan) for `model`: half its MLP and `heads` query heads
    as the uniform target, spent per layer by the "write" rule on random positive scores."""
    import dataclasses

    from compactlm.models.family import family_of
    from compactlm.pruning.per_layer import per_layer_plan

    fam = family_of(model)
    source = fam.dims(model.config)
    target = dataclasses.replace(source, ffn=int(source.ffn * ffn_fraction), heads=heads, kv_heads=heads // source.groups)
    scores = positive_scores(model, seed=seed)
    return fam, source, target, per_layer_plan(model, scores, fam, source, target, torch.arange(source.layers))
