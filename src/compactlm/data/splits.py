"""Documents into token rows: split by a stable hash of each document into train and validation, tokenise in
batches, pack into (N, seq_len) rows, sample the calibration rows, hand out batches."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from compactlm.errors import CompactLMError

log = logging.getLogger(__name__)

HASH_BUCKETS = 10_000
TOKENIZE_DOCS = 512  # documents per tokenizer call when building splits


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
