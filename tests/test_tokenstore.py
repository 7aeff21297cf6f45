"""The token store: the same rows as the in-memory split, built once, extended on demand, never half-written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compactlm import data
from compactlm.tokenstore import Source, open_store, store_root

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex every jovial bard".split()


def corpus(path, n: int, seed: int = 0):
    """A .jsonl file of n distinct documents."""
    g = np.random.default_rng(seed)
    path.write_text("".join(json.dumps({"text": f"doc {i}: " + " ".join(g.choice(WORDS, 30))}) + "\n"
                            for i in range(n)))
    return path


@pytest.fixture(autouse=True)
def own_root(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPACTLM_TOKENS", str(tmp_path / "stores"))


class Counting:
    """A tokenizer that counts the documents it encodes and can be made to fail at its n-th call."""

    def __init__(self, tok, fail_at: int | None = None, size: int | None = None):
        self.tok, self.docs, self.calls, self.fail_at, self.size = tok, 0, 0, fail_at, size

    def __call__(self, texts, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        self.docs += len(texts)
        return self.tok(texts, **kwargs)

    def __len__(self):
        return self.size or len(self.tok)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.mark.parametrize("n,seq_len", [(300, 16), (300, 7), (3, 4)])  # 3 documents: the split fallback moves one
def test_rows_equal_the_in_memory_split(n, seq_len, bpe_tokenizer, tmp_path):
    path = corpus(tmp_path / "c.jsonl", n)
    store = open_store(Source(str(path), val_fraction=0.1), bpe_tokenizer, progress=False)
    want = data.make_splits(data.load_texts(str(path)), bpe_tokenizer, seq_len, val_fraction=0.1, calib_sequences=0)
    assert store.meta["exhausted"] and store.meta["dtype"] == "uint16"
    assert torch.equal(store.rows("train", seq_len)[:], want.train.long())
    assert torch.equal(store.rows("val", seq_len)[:], want.val.long())


def test_second_open_reuses_the_store_without_tokenising(bpe_tokenizer, tmp_path):
    path = corpus(tmp_path / "c.jsonl", 200)
    first = Counting(bpe_tokenizer)
    open_store(Source(str(path)), first, progress=False)
    assert first.docs == 200
    again = Counting(bpe_tokenizer)
    store = open_store(Source(str(path)), again, progress=False)
    assert again.docs == 0 and store.meta["docs"] == 200
    path.write_text(path.read_text() + json.dumps({"text": "one more document"}) + "\n")  # the file changed
    changed = Counting(bpe_tokenizer)
    assert open_store(Source(str(path)), changed, progress=False).meta["docs"] == 201 and changed.docs == 201


def test_a_budget_then_an_extension_equals_one_build(bpe_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(data.splits, "TOKENIZE_DOCS", 16)
    path = corpus(tmp_path / "c.jsonl", 400)
    tok = Counting(bpe_tokenizer)
    small = open_store(Source(str(path)), tok, need_train_tokens=1000, progress=False)
    assert small.meta["tokens"]["train"] >= 1000 and not small.meta["exhausted"] and tok.docs < 100
    bigger = open_store(Source(str(path)), tok, need_train_tokens=3000, progress=False)
    assert bigger.meta["tokens"]["train"] >= 3000 and tok.docs == bigger.meta["docs"]  # nothing tokenised twice
    whole = open_store(Source(str(path)), tok, progress=False)
    monkeypatch.setenv("COMPACTLM_TOKENS", str(tmp_path / "one-shot"))
    once = open_store(Source(str(path)), bpe_tokenizer, progress=False)
    for split in ("train", "val"):
        assert np.array_equal(whole.tokens(split), once.tokens(split))


def test_an_interrupted_build_leaves_no_store(bpe_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(data.splits, "TOKENIZE_DOCS", 16)
    path = corpus(tmp_path / "c.jsonl", 100)
    with pytest.raises(KeyboardInterrupt):
        open_store(Source(str(path)), Counting(bpe_tokenizer, fail_at=3), progress=False)
    assert not any(store_root().glob("*/meta.json"))
    assert not [p for p in store_root().iterdir() if p.is_dir()]  # no store and no temp folder (the lock file stays)
    assert open_store(Source(str(path)), bpe_tokenizer, progress=False).meta["docs"] == 100


def test_an_interrupted_extension_keeps_the_old_store(bpe_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(data.splits, "TOKENIZE_DOCS", 16)
    path = corpus(tmp_path / "c.jsonl", 300)
    small = open_store(Source(str(path)), bpe_tokenizer, need_train_tokens=500, progress=False)
    before = {s: np.array(small.tokens(s)) for s in ("train", "val")}
    with pytest.raises(KeyboardInterrupt):
        open_store(Source(str(path)), Counting(bpe_tokenizer, fail_at=2), need_train_tokens=5000, progress=False)
    kept = open_store(Source(str(path)), bpe_tokenizer, need_train_tokens=500, progress=False)
    assert kept.meta == small.meta and all(np.array_equal(kept.tokens(s), before[s]) for s in before)
    whole = open_store(Source(str(path)), bpe_tokenizer, progress=False)  # appends after the counted tokens
    want = data.make_splits(data.load_texts(str(path)), bpe_tokenizer, 1, calib_sequences=0)
    assert torch.equal(whole.rows("train", 1)[:], want.train.long())


def test_a_vocabulary_over_65536_is_stored_as_uint32(bpe_tokenizer, tmp_path):
    path = corpus(tmp_path / "c.jsonl", 50)
    store = open_store(Source(str(path)), Counting(bpe_tokenizer, size=70_000), progress=False)
    assert store.meta["dtype"] == "uint32" and (store.path / "train.bin").stat().st_size == 4 * store.meta["tokens"]["train"]


def test_two_processes_building_the_same_store_at_once_agree(bpe_tokenizer, tmp_path):
    """torchrun's ranks open the same store together: one builds it, the other waits and reuses it."""
    import subprocess
    import sys

    path = corpus(tmp_path / "c.jsonl", 300)
    bpe_tokenizer.save_pretrained(tmp_path / "tok")
    code = ("import sys; from transformers import AutoTokenizer; from compactlm.tokenstore import Source, open_store;"
            f"s = open_store(Source({str(path)!r}), AutoTokenizer.from_pretrained({str(tmp_path / 'tok')!r}), "
            "progress=False); print(s.meta['tokens']['train'], s.meta['docs'])")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1] and outs[0][1] == "300"
    assert len([p for p in store_root().iterdir() if p.is_dir()]) == 1  # one store, no leftover temp folder
