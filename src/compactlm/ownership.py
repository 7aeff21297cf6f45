"""Who may write an output folder: one run at a time, never into what it reads, and it cleans up after killed runs.

`claim(cfg)` is what the CLI does before any work (under torchrun, rank 0 only):
- refuse an `out_dir` or `out` that is, or lies inside, the model, teacher, student or tokenizer being read;
- take `<parent>/.<name>.lock` (fcntl.flock, holding the pid, host and start time): a second process on the same
  out_dir gets a one-line error naming the holder. The kernel drops the lock when its holder dies, so a lock
  file left by a killed run is stale by construction and is simply taken over;
- once the lock is held, remove what killed runs of this out_dir left: staging folders and temp files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from compactlm.errors import CompactLMError

log = logging.getLogger(__name__)

SOURCE_KEYS = ("model", "teacher", "student", "tokenizer")
# temp names compactlm gives inside an out_dir: tempfile's 8 random characters after a dotted prefix
# (".prune.staging.k2j4_x9a", ".final.q8z1m3pa", ".model-q8_0.gguf.x1y2z3w4", ".shard.ab12cd34"), ".part", ".tmp"
_LEFTOVER = re.compile(r"^\..+\.[a-z0-9_]{8}(\.part)?$|^\..*\.tmp$")
_HELD: dict[Path, object] = {}  # lock files this process holds (nested claims of one out_dir are one claim)


def check_sources(cfg) -> None:
    """A one-line error when `out_dir` or `out` is, or lies inside, a local model, teacher, student or tokenizer
    that the command reads: the source is never written."""
    for out_key in ("out_dir", "out"):
        out = getattr(cfg, out_key, None)
        if not out:
            continue
        target = Path(out).resolve()
        for key in SOURCE_KEYS:
            source = getattr(cfg, key, None)
            if source and Path(source).exists():
                src = Path(source).resolve()
                if target == src or src in target.parents:
                    raise CompactLMError(f"{out_key}={out} would write into {key}={source}, which this command "
                                         f"reads: choose an {out_key} outside it")


@contextlib.contextmanager
def hold(out_dir: str | Path) -> Iterator[None]:
    """Hold the lock of `out_dir` for the block (see the module docstring); re-entrant within a process."""
    out = Path(out_dir).resolve()
    lock = out.parent / f".{out.name}.lock"
    if lock in _HELD:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = _holder(f.read())
        f.close()
        raise CompactLMError(f"out_dir {out_dir} is in use by another run ({holder}): wait for it, or choose "
                             "another out_dir") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
        f.flush()
        _HELD[lock] = f
        remove_leftovers(out)
        yield
    finally:
        _HELD.pop(lock, None)
        with contextlib.suppress(OSError):
            lock.unlink()  # before the unlock: a waiting process then creates a fresh file
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}, started {time.strftime('%Y-%m-%d %H:%M', time.localtime(info['started']))}"
    except (ValueError, KeyError, TypeError):
        return "a process that is still starting"


def remove_leftovers(out: Path) -> list[Path]:
    """Delete what killed runs of `out` left: `<parent>/.<name>.staging.*` and similar temp names beside it, and
    compactlm's temp names anywhere inside it. Returns what was removed."""
    beside = re.compile(rf"^\.{re.escape(out.name)}\.(staging\.|search\.)?[a-z0-9_]{{8}}$")  # this out_dir's only
    found = [p for p in out.parent.glob(f".{out.name}.*") if beside.match(p.name)]
    if out.is_dir():
        found += [p for p in out.rglob(".*") if _LEFTOVER.match(p.name)]
    for path in found:
        log.info("removing %s, left by an interrupted run", path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return found


@contextlib.contextmanager
def claim(cfg) -> Iterator[None]:
    """check_sources, then hold cfg.out_dir's lock (if it has one) for the block."""
    from compactlm.inputs import check_out_dir

    check_sources(cfg)
    if not cfg.out_dir or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    check_out_dir(cfg.out_dir)  # a writable place first: its one-line error beats the lock file's
    with hold(cfg.out_dir):
        yield
