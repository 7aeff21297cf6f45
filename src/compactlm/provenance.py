"""Where a run's inputs come from, written beside everything it makes: the header of compactlm.yaml, an
"Inputs" section of report.md, and the model card (README.md) of every model folder it writes.

One line per input: the data (the built-in python-docs snapshot, a built-in download, or local files, each with
the sha256 of its contents; a hub dataset by name) and every built-in model (what it is: the built-in SmolLM2
is a Q4_1 GGUF file, dequantized, not the original bf16 weights).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from compactlm import __version__, data
from compactlm.config import save_config
from compactlm.models.loading import BUILTIN_DESCRIPTIONS

MODEL_KEYS = ("model", "teacher", "student")


@functools.lru_cache(maxsize=8)
def _files_digest(files: tuple[tuple[str, int, int], ...]) -> str:
    """sha256 over the contents of (path, size, mtime) files in order (cached per size and mtime)."""
    h = hashlib.sha256()
    for path, _, _ in files:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def data_line(source: str) -> str:
    """`source` and the sha256 of what it reads (a hub dataset: its name only)."""
    if source == data.PYTHON_DOCS:
        return f"data {source}: the built-in snapshot of CPython 3.11.7's documentation, sha256 {data.PYTHON_DOCS_SHA256}"
    if source in data.DOWNLOADS:
        return f"data {source}: {data.DOWNLOADS[source].url}, sha256 {data.DOWNLOADS[source].sha256}"
    path = Path(source).expanduser()
    if path.exists():
        count, digest = path_digest(path)
        return f"data {source}: {count} file(s), sha256 {digest}"
    return f"data {source}: a Hugging Face dataset, read by name (no checksum)"


def path_digest(path: Path) -> tuple[int, str]:
    """(files, sha256 over their contents in sorted order) of a file or a folder's files."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return len(files), _files_digest(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


def lines(cfg) -> list[str]:
    """What a run's outputs say about its inputs: compactlm's version, the data, and each built-in model."""
    out = [f"compactlm {__version__}", data_line(cfg.data)]
    for key in MODEL_KEYS:
        spec = getattr(cfg, key, None)
        if spec in BUILTIN_DESCRIPTIONS:
            out.append(f"{key} {spec}: {BUILTIN_DESCRIPTIONS[spec]}")
    return out


def write_model_card(directory: str | Path, cfg, title: str, what: str) -> None:
    """`directory`/README.md: what the model is (`what`) and where its inputs came from."""
    text = "\n".join([f"# {title}", "", what, "", "## Inputs", "", *(f"- {line}" for line in lines(cfg)), "",
                      "The run's whole config is compactlm.yaml in its output folder."])
    (Path(directory) / "README.md").write_text(text + "\n", encoding="utf-8")


def write_config(cfg, path: str | Path) -> None:
    """The run's resolved config (compactlm.yaml), headed by the provenance `lines` as comments."""
    save_config(cfg, path, lines(cfg))


def recorded(config_file: str | Path) -> list[str]:
    """The provenance lines a run wrote at the head of its compactlm.yaml (none for a file without them)."""
    path = Path(config_file)
    if not path.is_file():
        return []
    head = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("# "):
            break
        head.append(line[2:])
    return head
