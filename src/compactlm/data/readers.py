"""Documents from wherever they live: a built-in corpus, .txt/.jsonl/.parquet files or folders of them, or a
Hugging Face dataset (streamed). Every reader yields one document (a str) at a time."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from compactlm.data.corpora import DOWNLOADS, PYTHON_DOCS, cached_download, one_line, python_docs
from compactlm.errors import CompactLMError

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
TXT_DOC_CHARS = 2000  # .txt: paragraphs are merged into documents of at least this many characters
_PATH_LIKE_SUFFIXES = FILE_SUFFIXES + (".json", ".csv", ".tsv", ".gz", ".md", ".arrow")


def iter_texts(source: str, *, text_field: str = "text", split: str = "train",
               max_chars: int | None = None) -> Iterator[str]:
    """Documents, lazily, from a built-in name (BUILTIN_DATA), a .txt/.jsonl/.parquet file or folder, or a HF
    dataset ("name[:config]", streamed); blank ones skipped, cut at `max_chars` characters in all."""
    if max_chars is not None and max_chars < 1:
        raise CompactLMError(f"max_chars must be a positive number of characters, got {max_chars}")
    path = Path(source).expanduser()
    if source == PYTHON_DOCS:
        docs: Iterable[str] = python_docs()
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
        raise CompactLMError(f"cannot read parquet file {path}: {one_line(e)}") from None
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
                             f"or not found): {one_line(e)}") from None
    if first is not None and text_field not in first:
        raise CompactLMError(f"dataset '{source}' has no column '{text_field}' (columns: {sorted(first)})")
    for record in dataset:  # streaming: documents arrive as they are read, nothing is held in memory
        value = record[text_field]
        if value is not None:
            yield str(value)


