"""A teacher's sparse targets for the rows a distillation consumes, computed once and kept on disk.

Position i of the cache is the i-th row the training stream consumes (the loop's seeded shuffle: rows are
cached in their order of use, so a run builds only what it will read). For each it holds the teacher's top-K
log-probabilities at the distillation temperature (float16) and their token ids (int32), (S, K) each: 6 * K
bytes per token; or, with targets="sampled", the shares of K draws from the teacher (`teacher_sampled`) in the
same layout. What `topk_kd_loss` distils from, instead of running the teacher at every step.

Layout: `root/<key>/shard-<i>.safetensors`, each holding positions [i * rows_per_shard, (i + 1) *
rows_per_shard). The key hashes everything the targets depend on: a fingerprint of the teacher (its config and
its logits on a probe of the data), all the train rows (tokenizer, data and sequence layout are in them), the
shuffle's seed, the kind of targets, K and the temperature; a longer run with the same key extends the cache.
Sampled targets draw from a generator seeded by the seed and the shard, so a resumed build draws what an
uninterrupted one would have. A shard is written to
a temporary file and renamed, so a killed build leaves whole shards only, and `build` resumes at the first
missing one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from compactlm.distill.losses import teacher_sampled, teacher_topk
from compactlm.errors import CompactLMError
from compactlm.files import as_if_created

Logits = Callable[[Tensor], Tensor]  # (b, S) token ids -> (b, S, V) teacher logits, on the teacher's device


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def teacher_fingerprint(config: dict, logits: Logits, probe: Tensor) -> str:
    """What identifies a teacher here: its config and its logits on `probe` (b, S), rounded to 1e-3, so that a
    different checkpoint with the same config gets a different key without hashing every weight."""
    with torch.no_grad():
        out = logits(probe).float().cpu()
    rounded = torch.round(out * 1000).to(torch.int64)
    return _digest(json.dumps(config, sort_keys=True, default=str).encode(), rounded.numpy().tobytes())


TARGETS = ("top_k", "sampled")


def cache_key(teacher: str, train_rows, seed: int, k: int, temperature: float, targets: str = "top_k") -> str:
    """The folder name of the targets of `teacher` (a fingerprint) on `train_rows` (N, S: a tensor or the token
    store's rows, read in blocks) consumed in the order of `seed`, at top `k` (or `k` draws, targets="sampled")
    and `temperature`."""
    h = hashlib.sha256()
    h.update(f"{teacher}|{tuple(train_rows.shape)}|{seed}|".encode())
    for start in range(0, len(train_rows), 4096):
        h.update(train_rows[start:start + 4096].to(torch.int64).contiguous().numpy().tobytes())
    return f"{'k' if targets == 'top_k' else 's'}{k}-t{temperature:g}-{h.hexdigest()[:16]}"


class TeacherCache:
    """The top-K (or K sampled) targets of `n_rows` positions (rows of `seq_len` tokens) in `folder`, in shards of
    `rows_per_shard` positions. `seed` seeds the draws of sampled targets."""

    def __init__(self, folder: str | Path, n_rows: int, seq_len: int, k: int, rows_per_shard: int = 256,
                 targets: str = "top_k", seed: int = 0):
        if min(n_rows, seq_len, k, rows_per_shard) < 1:
            raise CompactLMError(f"teacher cache: need rows, seq_len, K and rows per shard >= 1, got "
                                 f"{n_rows}, {seq_len}, {k}, {rows_per_shard}")
        if targets not in TARGETS:
            raise CompactLMError(f"teacher cache: targets {targets!r} is not one of {', '.join(TARGETS)}")
        self.folder, self.n_rows, self.seq_len, self.k = Path(folder), n_rows, seq_len, k
        self.targets, self.seed = targets, seed
        self.rows_per_shard = rows_per_shard
        self._open: dict[int, object] = {}
        self._generator: tuple[int, torch.Generator] | None = None  # (shard, its draws so far)

    @property
    def shards(self) -> int:
        return -(-self.n_rows // self.rows_per_shard)

    def shard_path(self, i: int) -> Path:
        return self.folder / f"shard-{i:05d}.safetensors"

    def missing(self) -> list[int]:
        return [i for i in range(self.shards) if not self.shard_path(i).is_file()]

    @staticmethod
    def bytes_per_token(k: int) -> int:
        return k * (2 + 4)  # float16 value + int32 id per kept token

    def build(self, logits: Logits, train_rows, temperature: float, batch_size: int = 8,
              progress: bool = True, order: Tensor | None = None) -> dict:
        """Compute and write every missing shard (a rerun resumes); returns what the cache holds. Position i is
        row order[i] of `train_rows` (N, S) (default: row i). Rows are read a shard at a time, and the top K are
        taken where `logits` leaves the logits (the GPU): the host holds O(batch x S x K), never the whole
        vocabulary nor every row."""
        order = torch.arange(len(train_rows)) if order is None else order
        if (len(order), train_rows.shape[1]) != (self.n_rows, self.seq_len):
            raise CompactLMError(f"teacher cache: rows ({len(order)}, {train_rows.shape[1]}) are not the cache's "
                                 f"({self.n_rows}, {self.seq_len})")
        self.folder.mkdir(parents=True, exist_ok=True)
        todo = self.missing()
        bar = tqdm(total=len(todo) * self.rows_per_shard, desc="teacher cache", unit="row", disable=not progress)
        for i in todo:
            rows = train_rows[order[i * self.rows_per_shard: (i + 1) * self.rows_per_shard]]
            parts = [[t.cpu() for t in self._targets(logits(batch), temperature, i)] for batch in rows.split(batch_size)]
            tensors = {"logp": torch.cat([p[0] for p in parts]).contiguous(),
                       "ids": torch.cat([p[1] for p in parts]).contiguous()}
            fd, tmp = tempfile.mkstemp(prefix=".shard.", dir=self.folder)
            os.close(fd)
            as_if_created(tmp)
            try:
                save_file(tensors, tmp)
                os.replace(tmp, self.shard_path(i))
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            bar.update(len(rows))
        bar.close()
        tokens = self.n_rows * self.seq_len
        return {"folder": str(self.folder), "rows": self.n_rows, "built_shards": len(todo), "tokens": tokens,
                "bytes": sum(self.shard_path(i).stat().st_size for i in range(self.shards)),
                "bytes_per_token": self.bytes_per_token(self.k)}

    def _targets(self, logits: Tensor, temperature: float, shard: int) -> tuple[Tensor, Tensor]:
        if self.targets == "top_k":
            return teacher_topk(logits, self.k, temperature)
        if self._generator is None or self._generator[0] != shard:  # one stream per shard: resumable
            g = torch.Generator(device=logits.device).manual_seed(self.seed * 1_000_003 + shard)
            self._generator = (shard, g)
        return teacher_sampled(logits, self.k, temperature, self._generator[1])

    def get(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """The targets at positions `rows` (b,): log-probabilities (b, S, K) float16 and ids (b, S, K) int32."""
        logp, ids = [], []
        for row in rows.tolist():
            if not 0 <= row < self.n_rows:
                raise CompactLMError(f"teacher cache: position {row} out of range (0..{self.n_rows - 1})")
            shard, offset = divmod(row, self.rows_per_shard)
            handle = self._open.get(shard)
            if handle is None:
                path = self.shard_path(shard)
                if not path.is_file():
                    raise CompactLMError(f"teacher cache: {path} is missing (build the cache first)")
                handle = self._open[shard] = safe_open(str(path), framework="pt")
            logp.append(handle.get_slice("logp")[offset: offset + 1])
            ids.append(handle.get_slice("ids")[offset: offset + 1])
        return torch.cat(logp), torch.cat(ids)
