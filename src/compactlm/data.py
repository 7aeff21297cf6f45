"""Corpora (built-in python-docs and downloads, local files, Hugging Face datasets), tokenise, pack, split."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import lzma
import re
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compactlm.errors import CompactLMError
from compactlm.files import as_if_created
from compactlm.cache import cache_dir

log = logging.getLogger(__name__)

PYTHON_DOCS = "python-docs"
# The python-docs corpus: a fixed snapshot shipped with the package (scripts/build_python_docs.py says how it was
# built), the same on every machine and Python; the sha256 of its JSON text, recorded in every run's outputs.
PYTHON_DOCS_FILE = Path(__file__).parent / "corpora" / "python-docs.json.xz"
PYTHON_DOCS_SHA256 = "125f3db8f1b48c3c8663050360dae13c2c1f50630636814bee71130378130ed8"


@dataclass(frozen=True)
class Download:
    """A built-in data set fetched once into the cache: a UTF-8 .txt file at `url`."""

    url: str
    sha256: str
    size: int  # bytes: the progress bar's total when the server sends no Content-Length


DOWNLOADS = {
    "tinyshakespeare": Download(
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", 1_115_394),
}
BUILTIN_DATA = (PYTHON_DOCS, *DOWNLOADS)  # data names that are neither paths nor hub datasets
DOWNLOAD_TIMEOUT_S = 60
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
TXT_DOC_CHARS = 2000  # .txt: paragraphs are merged into documents of at least this many characters
HASH_BUCKETS = 10_000
TOKENIZE_DOCS = 512  # documents per tokenizer call when building splits
_PATH_LIKE_SUFFIXES = FILE_SUFFIXES + (".json", ".csv", ".tsv", ".gz", ".md", ".arrow")


# ---------------------------------------------------------------- loading

def iter_texts(source: str, *, text_field: str = "text", split: str = "train",
               max_chars: int | None = None) -> Iterator[str]:
    """Documents, lazily, from a built-in name (BUILTIN_DATA), a .txt/.jsonl/.parquet file or folder, or a HF
    dataset ("name[:config]", streamed); blank ones skipped, cut at `max_chars` characters in all."""
    if max_chars is not None and max_chars < 1:
        raise CompactLMError(f"max_chars must be a positive number of characters, got {max_chars}")
    path = Path(source).expanduser()
    if source == PYTHON_DOCS:
        docs: Iterable[str] = _python_docs()
    elif source in DOWNLOADS:
        docs = _txt_docs(cached_download(source))
    elif path.exists():
        docs = _dir_docs(path, text_field) if path.is_dir() else _file_docs(path, text_field)
    elif source.startswith(("/", ".", "~")) or path.suffix.lower() in _PATH_LIKE_SUFFIXES:
        raise CompactLMError(f"data file not found: {source}")
    else:
        docs = _hub_docs(source, text_field, split)
    count = 0
    for doc in _prefix(docs, max_chars):
        count += 1
        yield doc
    if not count:
        raise CompactLMError(f"no non-empty text in data source {source} (field '{text_field}')")


def load_texts(source: str, *, text_field: str = "text", split: str = "train",
               max_chars: int | None = None) -> list[str]:
    """All documents of `iter_texts` as a list (small corpora; `make_splits` streams instead)."""
    texts = list(iter_texts(source, text_field=text_field, split=split, max_chars=max_chars))
    log.info("loaded %d documents, %d characters from %s", len(texts), sum(map(len, texts)), source)
    return texts


def _prefix(docs: Iterable[str], max_chars: int | None) -> Iterator[str]:
    """Non-blank documents in order, cut so that their total length is at most max_chars."""
    total = 0
    for doc in docs:
        if not doc.strip():
            continue
        if max_chars is not None and total + len(doc) >= max_chars:
            if doc[: max_chars - total].strip():
                yield doc[: max_chars - total]
            return
        yield doc
        total += len(doc)


def _dir_docs(folder: Path, text_field: str) -> Iterator[str]:
    """Documents of every supported file under folder, in sorted path order."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise CompactLMError(f"no {'/'.join(FILE_SUFFIXES)} files in data folder {folder}")
    for file in files:
        yield from _file_docs(file, text_field)


def _file_docs(path: Path, text_field: str) -> Iterator[str]:
    """Documents of one .txt/.jsonl/.parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _txt_docs(path)
    if suffix == ".jsonl":
        return _jsonl_docs(path, text_field)
    if suffix == ".parquet":
        return _parquet_docs(path, text_field)
    raise CompactLMError(f"unsupported data file extension '{path.suffix}' in {path} "
                         f"(use {', '.join(FILE_SUFFIXES)}, a folder of them, or a dataset name)")


_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


def _paragraphs(path: Path, chunk_chars: int = 1 << 20) -> Iterator[str]:
    """The text between blank lines, read in chunks (a file larger than memory streams): the same pieces as
    `_PARAGRAPH_BREAK.split(whole_text)`, since a break never spans more than the carried-over tail."""
    try:
        with path.open(encoding="utf-8") as f:
            carry = ""
            while chunk := f.read(chunk_chars):
                parts = _PARAGRAPH_BREAK.split(carry + chunk)
                carry = parts.pop()  # may continue in the next chunk
                yield from parts
            yield carry
    except UnicodeDecodeError as e:
        raise CompactLMError(f"{path} is not UTF-8 text (byte {e.start} of a chunk)") from None


def _txt_docs(path: Path) -> Iterator[str]:
    """Paragraphs (split at blank lines) merged into documents of at least TXT_DOC_CHARS characters."""
    done, current = None, []  # `done` waits one step: a short tail at the end joins it
    size = -2  # "\n\n" joins paragraphs: n paragraphs add 2 * (n - 1) characters
    for paragraph in _paragraphs(path):
        paragraph = paragraph.strip("\r\n")
        if not paragraph.strip():
            continue
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= TXT_DOC_CHARS:
            if done is not None:
                yield done
            done, current, size = "\n\n".join(current), [], -2
    if current:  # a short tail joins the previous document
        tail = "\n\n".join(current)
        done = done + "\n\n" + tail if done is not None else tail
    if done is not None:
        yield done


def _jsonl_docs(path: Path, text_field: str) -> Iterator[str]:
    """The text_field of every JSON object, one per line."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CompactLMError(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CompactLMError(f"{path}:{lineno}: corrupt JSON line ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise CompactLMError(f"{path}:{lineno}: no field '{text_field}' in JSON line")
            value = record[text_field]
            if value is None:
                continue
            if not isinstance(value, str):
                raise CompactLMError(f"{path}:{lineno}: field '{text_field}' is {type(value).__name__}, "
                                     "not a string")
            yield value


def _parquet_docs(path: Path, text_field: str) -> Iterator[str]:
    """The text_field column of a parquet file, read in batches."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a corrupt file
        raise CompactLMError(f"cannot read parquet file {path}: {_one_line(e)}") from None
    if text_field not in parquet.schema_arrow.names:
        raise CompactLMError(f"{path}: no column '{text_field}' (columns: {parquet.schema_arrow.names})")
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield str(value)


def _hub_docs(source: str, text_field: str, split: str) -> Iterator[str]:
    """The text_field column of a Hugging Face dataset split, streamed; source is "name" or "name:config"."""
    import datasets

    name, _, config = source.partition(":")
    try:
        dataset = datasets.load_dataset(name, config or None, split=split, streaming=True)
        first = next(iter(dataset), None)
    except Exception as e:  # offline, unknown name, unknown split or config: all one-line errors
        raise CompactLMError(f"cannot load dataset '{source}' split '{split}' (not a local file, offline "
                             f"or not found): {_one_line(e)}") from None
    if first is not None and text_field not in first:
        raise CompactLMError(f"dataset '{source}' has no column '{text_field}' (columns: {sorted(first)})")
    for record in dataset:  # streaming: documents arrive as they are read, nothing is held in memory
        value = record[text_field]
        if value is not None:
            yield str(value)


def _one_line(error: Exception, limit: int = 200) -> str:
    """First line of an exception's message, shortened."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- downloaded data sets

def cached_download(name: str) -> Path:
    """The cached file of built-in data set `name`, downloaded on first use."""
    record = DOWNLOADS[name]
    dest = cache_dir() / "data" / f"{name}.txt"
    if not dest.is_file():
        log.info("downloading data set %s from %s to %s", name, record.url, dest)
        download(record.url, dest, record.sha256, size=record.size)
    return dest


def download(url: str, dest: Path, sha256: str, *, size: int | None = None,
             opener: Callable = urllib.request.urlopen, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Fetch `url` into a temp file beside `dest`, renamed to `dest` only when its sha256 matches."""
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp, digest = as_if_created(name), hashlib.sha256()
    try:
        with open(fd, "wb") as out:
            try:
                with opener(url, timeout=timeout) as response:
                    length = getattr(response, "headers", {}).get("Content-Length")
                    with tqdm(total=int(length) if length else size, unit="B", unit_scale=True,
                              desc=dest.name) as bar:
                        while chunk := response.read(1 << 16):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
            except (OSError, ValueError) as e:  # URLError, timeouts and refused connections are OSErrors
                raise CompactLMError(f"cannot download {url} ({_one_line(e, 120)}): offline? "
                                     "pass data=FILE with a local copy of it") from None
        if digest.hexdigest() != sha256:
            raise CompactLMError(f"download of {url} is corrupt: sha256 {digest.hexdigest()} is not the expected "
                                 f"{sha256}; retry, or pass data=FILE with a local copy of it")
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# ---------------------------------------------------------------- python-docs

def _python_docs() -> list[str]:
    """A copy of the cached python-docs corpus (so callers may mutate it)."""
    return list(_python_docs_cached())


@functools.lru_cache(maxsize=1)
def _python_docs_cached() -> tuple[str, ...]:
    """The shipped python-docs snapshot (scripts/build_python_docs.py), its checksum verified."""
    try:
        raw = lzma.decompress(PYTHON_DOCS_FILE.read_bytes())
    except (OSError, lzma.LZMAError) as e:
        raise CompactLMError(f"python-docs: cannot read the shipped corpus {PYTHON_DOCS_FILE}: {e}") from None
    if hashlib.sha256(raw).hexdigest() != PYTHON_DOCS_SHA256:
        raise CompactLMError(f"python-docs: {PYTHON_DOCS_FILE} is not the shipped snapshot (sha256 differs): reinstall")
    return tuple(json.loads(raw))


# ---------------------------------------------------------------- splits

@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors element-wise has no single truth value
class Splits:
    """Packed token rows for calibration (a sample of train), training and validation."""

    calib: torch.Tensor  # (N_calib, seq_len) token ids; `batches` hands rows out as int64
    train: torch.Tensor  # (N_train, seq_len): int32 in memory (make_splits), or tokenstore.TokenRows read on demand
    val: torch.Tensor  # (N_val, seq_len): the same kind as train


def doc_hash(text: str) -> int:
    """Stable bucket in [0, 10_000) of a document: zlib.crc32 of its UTF-8 bytes."""
    return zlib.crc32(text.encode("utf-8")) % HASH_BUCKETS


def assign_val(texts: list[str], val_fraction: float) -> list[bool]:
    """Per document: True if it belongs to validation (by doc_hash only; never depends on seed or seq_len)."""
    if not 0.0 < val_fraction < 1.0:
        raise CompactLMError(f"val_fraction must be in (0, 1), got {val_fraction}")
    return _assign(np.array([doc_hash(t) for t in texts]), val_fraction).tolist()


def _assign(hashes: np.ndarray, val_fraction: float) -> np.ndarray:
    """(n,) bool: hash below the fraction; with 2+ documents, at least one in each split (ties: the first)."""
    is_val = hashes < val_fraction * HASH_BUCKETS
    if len(hashes) >= 2 and not is_val.any():  # smallest hash goes to val
        is_val[int(np.argmin(hashes))] = True
    if len(hashes) >= 2 and is_val.all():  # largest hash goes back to train
        is_val[int(np.argmax(hashes))] = False
    return is_val


def make_splits(texts: Iterable[str], tokenizer, seq_len: int, *, val_fraction: float = 0.05,
                calib_sequences: int = 128, seed: int = 0, max_tokens: int | None = None) -> Splits:
    """Split documents by hash into train/val, tokenise, pack into (N, seq_len) rows; calib samples train.

    `texts` is read once, lazily, and tokenised in batches of documents (a streamed hub dataset never sits in
    memory as text); with `max_tokens`, reading stops once the train split holds that many tokens.
    The split is `assign_val`'s: a document's hash alone decides, so every prefix of a stream agrees.
    """
    if seq_len < 1:
        raise CompactLMError(f"seq_len must be >= 1, got {seq_len}")
    if calib_sequences < 0:
        raise CompactLMError(f"calib_sequences must be >= 0, got {calib_sequences}")
    if not 0.0 < val_fraction < 1.0:
        raise CompactLMError(f"val_fraction must be in (0, 1), got {val_fraction}")
    docs: list[tuple[int, np.ndarray]] = []  # (hash, ids + eos as int32) per document, in order
    train_tokens = 0
    for batch in batched((t for t in texts if t.strip()), TOKENIZE_DOCS):
        ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for text, doc in zip(batch, ids):
            docs.append((doc_hash(text), _with_eos(doc, tokenizer)))
            train_tokens += len(docs[-1][1]) if docs[-1][0] >= val_fraction * HASH_BUCKETS else 0
        if max_tokens is not None and train_tokens >= max_tokens:
            log.info("splits: stopped reading at %d train tokens (dataset.max_tokens)", train_tokens)
            break
    if not docs:
        raise CompactLMError("no non-empty text to split into train and validation")
    is_val = _assign(np.array([h for h, _ in docs]), val_fraction)
    val = _pack(_concat([d for (_, d), v in zip(docs, is_val) if v]), seq_len, "validation")
    train = _pack(_concat([d for (_, d), v in zip(docs, is_val) if not v]), seq_len, "train")
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(train), generator=generator)[:calib_sequences].sort().values
    log.info("splits: %d train, %d val, %d calib rows of %d tokens", len(train), len(val), len(keep), seq_len)
    return Splits(calib=train[keep], train=train, val=val)


def batched(texts: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _with_eos(ids: list[int], tokenizer) -> np.ndarray:
    """A document's ids followed by eos when the tokenizer has one, as int32 (every vocabulary fits)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return np.asarray(ids + [eos] if eos is not None else ids, dtype=np.int32)


def _concat(docs: list[np.ndarray]) -> torch.Tensor:
    """(T,) int32 token stream of documents in order."""
    return torch.from_numpy(np.concatenate(docs)) if docs else torch.zeros(0, dtype=torch.int32)


def _pack(stream: torch.Tensor, seq_len: int, split: str) -> torch.Tensor:
    """(N, seq_len) rows of a token stream; the remainder shorter than seq_len is dropped."""
    rows = len(stream) // seq_len
    if rows == 0:
        raise CompactLMError(f"{split} split has {len(stream)} tokens, fewer than seq_len={seq_len}: "
                             "use more text or a smaller seq_len")
    return stream[: rows * seq_len].view(rows, seq_len)


def batches(tokens: torch.Tensor, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """In-order batches {"input_ids", "attention_mask"}, each (B, S) long; the last may be smaller."""
    if batch_size < 1:
        raise CompactLMError(f"batch_size must be >= 1, got {batch_size}")
    if tokens.dim() != 2:
        raise CompactLMError(f"token rows must be 2-D (N, seq_len), got shape {tuple(tokens.shape)}")
    for start in range(0, len(tokens), batch_size):
        input_ids = tokens[start: start + batch_size].long()
        yield {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
