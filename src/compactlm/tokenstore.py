"""A token store: a data source tokenised once into memory-mapped token files, cached by source and tokenizer.

    <store>/train.bin, val.bin   the two splits' token streams (uint16 when the vocabulary fits, else uint32):
                                 documents in source order, each followed by eos, split by `data.doc_hash`
    <store>/docs.bin             (documents, 2) uint64: the train and val token counts after each document
    <store>/meta.json            written last, atomically: token counts, documents read, whether the source
                                 is exhausted; a reader trusts only what meta.json counts

Stores live in `COMPACTLM_TOKENS` (default `<compactlm cache>/tokens`), one folder per key: the source (a local
file's path, size and mtime), its reading options, the validation fraction and the tokenizer's fingerprint.
A stage asks for the train tokens it needs: the store is built in one streaming pass (bounded memory, the
tokenizer's batch encoder, a progress bar) up to that budget, extended later when a stage needs more, and
reused as it is otherwise. A build happens in a temp folder renamed in at the end; an extension appends past
the counted tokens and rewrites meta.json last, so an interrupted one leaves the old store intact.

A stage reads a prefix of the store, not all of it (`TokenStore.prefix`): the documents up to the one with which
train reached the tokens the stage asked for, exactly what a store built for that stage alone would hold. So
the rows a stage uses depend on its config, never on how far earlier runs extended the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from compactlm import data
from compactlm.data import splits
from compactlm.errors import CompactLMError
from compactlm.files import as_if_created
from compactlm.cache import tokens_dir

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
_HUGE = 1 << 62  # no budget: read the whole source
FORMAT = 2  # 2: docs.bin (a store of format 1 has none and is built anew under its new key)


@dataclass(frozen=True)
class Source:
    """What is tokenised: a data source and how it is read and split."""

    source: str
    text_field: str = "text"
    split: str = "train"
    max_chars: int | None = None
    val_fraction: float = 0.05


def store_root() -> Path:
    """Where token stores live: COMPACTLM_TOKENS, default <compactlm cache>/tokens."""
    return tokens_dir()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything that decides the ids: the tokenizer's full JSON (fast tokenizers) or its vocabulary,
    and its eos id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{text}\n{tokenizer.eos_token_id}".encode()).hexdigest()


def store_key(src: Source, tokenizer) -> str:
    """The store folder name for (source, tokenizer); a local file's size and mtime are part of it."""
    identity = asdict(src) | {"format": FORMAT}
    if src.source == data.PYTHON_DOCS:  # the shipped snapshot
        identity["sha256"] = data.PYTHON_DOCS_SHA256
    path = Path(src.source).expanduser()
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        identity["files"] = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    identity["tokenizer"] = tokenizer_fingerprint(tokenizer)
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


class TokenRows:
    """(N, seq_len) rows of a memory-mapped token stream, read on demand: indexing gives int64 tensors."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.seq_len = seq_len
        n = len(tokens) // seq_len
        self.rows = tokens[: n * seq_len].reshape(n, seq_len)  # a view: nothing is read yet

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.rows.shape)

    def __getitem__(self, index) -> torch.Tensor:
        """Rows by int, slice or index tensor -> int64 tensor (only those rows are read from disk)."""
        index = index.numpy() if isinstance(index, torch.Tensor) else index
        return torch.from_numpy(np.array(self.rows[index], dtype=np.int64))


@dataclass
class TokenStore:
    """An opened store: its folder and meta.json."""

    path: Path
    meta: dict

    def tokens(self, split: str) -> np.ndarray:
        """(T,) the split's whole token stream, memory-mapped (T from meta.json)."""
        count = self.meta["tokens"][split]
        if count == 0:
            return np.zeros(0, dtype=self.meta["dtype"])
        return np.memmap(self.path / f"{split}.bin", dtype=self.meta["dtype"], mode="r", shape=(count,))

    def rows(self, split: str, seq_len: int, tokens: int | None = None) -> TokenRows:
        """The split's first `tokens` tokens (default: all) packed into rows of seq_len (the remainder dropped)."""
        return TokenRows(self.tokens(split)[:tokens], seq_len)

    def prefix(self, train_tokens: int, val_tokens: int = 0) -> tuple[int, int]:
        """(train, val) token counts of the documents read until train held `train_tokens` and val `val_tokens`
        (all of them when the store ends first): what a store built to that budget alone holds, however far
        this one was extended."""
        n = self.meta["docs"]
        counts = np.memmap(self.path / "docs.bin", dtype=np.uint64, mode="r", shape=(n, 2)) if n else np.zeros((0, 2))
        # the first document after which both splits hold their budget (both columns only grow)
        at = max(int(np.searchsorted(counts[:, 0], train_tokens)), int(np.searchsorted(counts[:, 1], val_tokens)))
        if at >= n or self.meta.get("moved"):  # the whole store (a tiny source's split fallback moved a document)
            return self.meta["tokens"]["train"], self.meta["tokens"]["val"]
        return int(counts[at, 0]), int(counts[at, 1])


def open_store(src: Source, tokenizer, need_train_tokens: int | None = None, need_val_tokens: int = 0, *,
               progress: bool = True) -> TokenStore:
    """The store of (src, tokenizer) with at least `need_train_tokens` train and `need_val_tokens` val tokens, or
    the whole source when None: reused when it has them, extended when it has fewer, built when there is none."""
    if not 0.0 < src.val_fraction < 1.0:
        raise CompactLMError(f"val_fraction must be in (0, 1), got {src.val_fraction}")
    need = (_HUGE if need_train_tokens is None else need_train_tokens, need_val_tokens)
    path = store_root() / store_key(src, tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent / f".{path.name}.lock"):  # torchrun's ranks: one builds, the others then reuse
        return _open(path, src, tokenizer, need, progress)


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl.flock) held for the block; released when the process dies too."""
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _open(path: Path, src: Source, tokenizer, need: tuple[int, int], progress: bool) -> TokenStore:
    meta = _read_meta(path)
    if meta is not None and (meta["exhausted"] or _holds(meta, need)):
        log.info("token store %s: reused (%d train, %d val tokens)", path, *meta["tokens"].values())
        return TokenStore(path, meta)
    if meta is None:  # a fresh build goes to a temp folder, renamed in once complete
        work = as_if_created(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            meta = _fill(work, src, tokenizer, need, _empty_meta(src, tokenizer), progress)
            if path.exists():  # a folder left without meta.json by an old interrupted extension
                shutil.rmtree(path)
            work.rename(path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    else:  # extend in place: append past the counted tokens, meta.json last
        meta = _fill(path, src, tokenizer, need, meta, progress)
    log.info("token store %s: %d train, %d val tokens", path, *meta["tokens"].values())
    return TokenStore(path, _read_meta(path))


def _holds(meta: dict, need: tuple[int, int]) -> bool:
    """The store holds at least (train, val) tokens."""
    return meta["tokens"]["train"] >= need[0] and meta["tokens"]["val"] >= need[1]


def _empty_meta(src: Source, tokenizer) -> dict:
    dtype = "uint16" if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else "uint32"
    return {"source": asdict(src), "dtype": dtype, "tokens": {"train": 0, "val": 0}, "docs": 0,
            "exhausted": False, "min_train_doc": None, "max_val_doc": None}


def _read_meta(path: Path) -> dict | None:
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _write_meta(path: Path, meta: dict) -> None:
    tmp = path / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    for split in (*SPLITS, "docs"):  # the tokens meta.json counts are on disk before it counts them
        with open(path / f"{split}.bin", "ab") as f:
            os.fsync(f.fileno())
    tmp.replace(path / "meta.json")


def _fill(path: Path, src: Source, tokenizer, need: tuple[int, int], meta: dict, progress: bool) -> dict:
    """Append documents after the `meta["docs"]` already stored until train and val hold `need` tokens or the
    source ends; returns the new meta (written to path/meta.json)."""
    from tqdm.auto import tqdm

    dtype, eos = np.dtype(meta["dtype"]), tokenizer.eos_token_id
    texts = data.iter_texts(src.source, text_field=src.text_field, split=src.split, max_chars=src.max_chars)
    texts = itertools.islice(texts, meta["docs"], None)  # documents already stored are read, not tokenised
    files = {}
    sizes = {split: meta["tokens"][split] * dtype.itemsize for split in SPLITS} | {"docs": meta["docs"] * 16}
    for name, size in sizes.items():
        f = open(path / f"{name}.bin", "ab")
        f.truncate(size)  # drop what an interrupted extension left
        files[name] = f
    exhausted = True
    batches = splits.batched(texts, splits.TOKENIZE_DOCS)
    first = next(batches, None)  # a missing or unreadable source fails here, before any progress bar
    try:
        with tqdm(total=None if need[0] == _HUGE else need[0], initial=meta["tokens"]["train"], unit="tok",
                  desc="tokenise", disable=not progress, unit_scale=True) as bar:
            for batch in itertools.chain([first] if first else [], batches):
                ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
                for text, doc in zip(batch, ids):
                    _append(files, meta, text, doc, eos, dtype, src.val_fraction)
                bar.update(meta["tokens"]["train"] - bar.n)
                if _holds(meta, need):
                    exhausted = False
                    break
    finally:
        for f in files.values():
            f.close()
    meta["exhausted"] = exhausted
    if exhausted:
        _every_split_nonempty(path, meta, dtype)
    if meta["docs"] == 0:
        raise CompactLMError(f"no non-empty text in data source {src.source}")
    _write_meta(path, meta)
    return meta


def _append(files: dict, meta: dict, text: str, ids: list[int], eos: int | None, dtype, val_fraction: float) -> None:
    """Write one document to its split; keep the smallest-hash train and largest-hash val document's place."""
    h = data.doc_hash(text)
    split = "val" if h < val_fraction * splits.HASH_BUCKETS else "train"
    arr = np.asarray(ids + [eos] if eos is not None else ids, dtype=dtype)
    doc = {"hash": h, "offset": meta["tokens"][split], "length": len(arr)}
    files[split].write(arr.tobytes())
    meta["tokens"][split] += len(arr)
    meta["docs"] += 1
    files["docs"].write(np.array([meta["tokens"]["train"], meta["tokens"]["val"]], dtype=np.uint64).tobytes())
    if split == "train" and (meta["min_train_doc"] is None or h < meta["min_train_doc"]["hash"]):
        meta["min_train_doc"] = doc
    if split == "val" and (meta["max_val_doc"] is None or h > meta["max_val_doc"]["hash"]):
        meta["max_val_doc"] = doc


def _every_split_nonempty(path: Path, meta: dict, dtype) -> None:
    """A tiny source whose hashes put every document in one split: move one over (data.assign_val's rule)."""
    if meta["docs"] < 2 or (meta["tokens"]["train"] and meta["tokens"]["val"]):
        return
    source, target, doc = ("train", "val", meta["min_train_doc"]) if not meta["tokens"]["val"] else \
        ("val", "train", meta["max_val_doc"])
    tokens = np.fromfile(path / f"{source}.bin", dtype=dtype)
    start, end = doc["offset"], doc["offset"] + doc["length"]
    np.concatenate([tokens[:start], tokens[end:]]).tofile(path / f"{source}.bin")
    tokens[start:end].tofile(path / f"{target}.bin")
    meta["tokens"][source] -= doc["length"]
    meta["tokens"][target] = doc["length"]
    meta["moved"] = True  # docs.bin no longer tells the splits apart: `prefix` reads the whole store
