"""tokenizer=char: vocabulary, exact round trips, save/load, reuse of a run's tokenizer, train end to end."""

from __future__ import annotations

import json
import random

import pytest
from conftest import tiny_config
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from compactlm.chartok import build_char_tokenizer, prepare_tokenizer
from compactlm.cli import main
from compactlm.config import Config
from compactlm.errors import CompactLMError
from compactlm.models.loading import load_tokenizer

WORDS = "thou art more lovely and temperate rough winds do shake the darling buds of may".split()


def play(lines: int, seed: int = 0) -> str:
    """Generated play-like text: speakers, punctuation, blank lines, double spaces, a tab."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        out.append(f"{rng.choice(['ROMEO', 'JULIET', 'NURSE'])}:\n{words.capitalize()}{rng.choice(',.;!?')}"
                   + ("\n" if i % 4 == 3 else ""))
    return "\n".join(out) + "\n\tExeunt  ,  all .\n"


def test_vocabulary_and_exact_round_trip():
    text = play(40)
    tok = build_char_tokenizer([text, "é\r"])
    assert isinstance(tok, PreTrainedTokenizerFast)
    chars = sorted(set(text + "é\r"))
    assert len(tok) == len(chars) + 2 and tok.eos_token == tok.pad_token == "<eos>"
    assert tok.convert_ids_to_tokens(list(range(len(tok)))) == ["<eos>", "<unk>", *chars]  # sorted, as nanoGPT
    sample = text[:300] + " a  b , d .\n\n\te\r\né"  # spaces before punctuation stay: no clean-up
    ids = tok(sample, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(sample) and tok.unk_token_id not in ids
    assert tok.decode(ids) == sample
    assert tok(text)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]  # no bos/eos added


def test_unknown_characters_map_to_unk():
    tok = build_char_tokenizer(["abc def\n"])
    ids = tok("abXc€", add_special_tokens=False)["input_ids"]
    assert ids == [tok.convert_tokens_to_ids(c) if c in "abc" else tok.unk_token_id for c in "abXc€"]
    assert tok.decode(ids) == "ab<unk>c<unk>" and tok.decode(ids, skip_special_tokens=True) == "abc"


def test_save_and_load_round_trip(tmp_path):
    text = play(30)
    tok = build_char_tokenizer([text])
    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert again(text, add_special_tokens=False)["input_ids"] == ids and again.decode(ids) == text
    assert (len(again), again.eos_token_id, again.pad_token_id, again.unk_token_id) == (len(tok), 0, 0, 1)


def test_prepare_tokenizer_builds_once_and_reuses(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(play(50), encoding="utf-8")
    cfg = Config(tokenizer="char", data=str(corpus))
    assert prepare_tokenizer(Config(data=str(corpus)), tmp_path / "run") == Config(data=str(corpus))  # not char
    prepared = prepare_tokenizer(cfg, tmp_path / "run")
    assert prepared.tokenizer == str(tmp_path / "run" / "tokenizer") and prepared.data == cfg.data
    first = load_tokenizer(prepared.tokenizer)  # loads like any model's tokenizer
    assert first.get_vocab() == build_char_tokenizer([corpus.read_text()]).get_vocab()
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["tokenizer"]  # no temp dir left

    corpus.write_text(play(50) + "Zz#\n", encoding="utf-8")  # new characters: a resumed run keeps its ids
    assert prepare_tokenizer(cfg, tmp_path / "run") == prepared
    assert load_tokenizer(prepared.tokenizer).get_vocab() == first.get_vocab()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """The tiny GPT-2 architecture as a config-only model directory (vocabulary 64)."""
    path = tmp_path_factory.mktemp("gpt2-config")
    tiny_config("gpt2", 4, 4, tied=True).save_pretrained(path)
    return path


def test_train_from_scratch_with_char_tokenizer(gpt2_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    extra = "".join(map(chr, range(0x100, 0x140)))  # 64 more characters than play() has: above the config's 64
    corpus.write_text(play(300) + "\n\n" + extra * 10, encoding="utf-8")
    out = tmp_path / "run"
    args = ["train", f"model={gpt2_dir}", "init=random", "tokenizer=char", f"data={corpus}", f"out_dir={out}",
            "train.steps=3", "train.batch_size=2", "train.seq_len=32", "train.lr=0.003", "train.warmup_steps=1",
            "train.eval_every=0", "train.eval_sequences=2", "train.save_every=0"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tok = load_tokenizer(str(out / "tokenizer"))
    config = json.loads((out / "final" / "config.json").read_text())
    assert len(tok) > 64 and config["vocab_size"] == len(tok)
    assert config["eos_token_id"] == config["pad_token_id"] == config["bos_token_id"] == tok.eos_token_id
    assert (out / "final" / "tokenizer.json").is_file() and (out / "final" / "model.safetensors").is_file()
    assert AutoTokenizer.from_pretrained(out / "final").get_vocab() == tok.get_vocab()
    assert result["steps"] == 3


def test_pretrained_model_with_a_larger_tokenizer_is_an_error(gpt2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(tiny_config("gpt2", 4, 4, tied=True)).save_pretrained(tmp_path / "model")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(map(chr, range(0x4E00, 0x4E00 + 100))) * 20, encoding="utf-8")  # 100 characters
    cfg = Config(model=str(tmp_path / "model"), tokenizer="char", data=str(corpus), out_dir=str(tmp_path / "run"))
    from compactlm.stages import train as run_train

    with pytest.raises(CompactLMError, match=r"tokenizer .*tokenizer has 102 tokens, more than the vocabulary \(64\)") as info:
        run_train(cfg)
    assert "\n" not in str(info.value)
