"""What every benchmark writes: `benchmarks/results/<name>.json`, the source of every number in the docs.

A result holds the command that produced it, the commit and machine it ran on, the hashes of its inputs, every
figure the script printed (`figures`, the script's own layout), the tables the docs show (`tables`: columns and
rows of cells, formatted as printed) and single values quoted in prose (`values`). `scripts/render_results.py`
renders the tables and values into README.md and docs/RESULTS.md; a test fails when the two disagree.

    from common import Table, write_result
    table = Table(["model", "perplexity"]); table.add("teacher", 28.1)
    write_result("my_bench", figures={...}, tables={"main": table}, inputs={"data": "python-docs"})
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# The README's shape and the KD recipe the benchmarks' tables were measured with, declared once: SmolLM2-135M
# (134.5M parameters) cut to 67.6M, distilled 8 x 256 tokens a step with AdamW, LR 1e-3 cosine to 1e-4 after 5
# warm-up steps. (configs/smollm2-135m.yaml now takes 2 rows a step and half the data's CE: benchmarks/recipe.py.)
README_SHAPE = {"hidden_size": 384, "num_attention_heads": 6, "intermediate_size": 1024}
TARGET = [f"target.{key}={value}" for key, value in README_SHAPE.items()]  # as `key=value` overrides
KD_RECIPE = {"batch_size": 8, "seq_len": 256, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 5}
KD_TOKENS = 163_840  # the main command's budget until 2026-12-04 (80 steps of 8 x 256); the tables measured at it keep it


def readme_cut(seed: int = 0):
    """SmolLM2-135M (float32) and a plan that cuts it to README_SHAPE by random scores: for speed and memory
    measurements, which do not depend on which units are kept. Returns (model, plan)."""
    import dataclasses

    import torch

    from compactlm.importance.scores import Scores
    from compactlm.models.family import family_of
    from compactlm.models.loading import load_model
    from compactlm.pruning import make_plan

    model = load_model("smollm2-135m")
    dims = family_of(model).dims(model.config)
    g = torch.Generator().manual_seed(seed)
    scores = Scores(torch.rand(dims.hidden, generator=g), torch.rand(dims.layers, dims.heads, generator=g),
                    torch.rand(dims.layers, dims.ffn, generator=g))
    target = dataclasses.replace(dims, hidden=README_SHAPE["hidden_size"], heads=README_SHAPE["num_attention_heads"],
                                 ffn=README_SHAPE["intermediate_size"])
    return model, make_plan(scores, dims, target, [])


def kd_keys(section: str = "distill", **changes) -> list[str]:
    """The KD recipe with `changes` as `section.key=value` overrides (section: distill or train)."""
    return [f"{section}.{key}={value}" for key, value in (KD_RECIPE | changes).items()]


class Table:
    """A results table: column names and rows of cells (str, or numbers formatted by `fmt`)."""

    def __init__(self, columns: list[str]):
        self.columns, self.rows = list(columns), []

    def add(self, *cells) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self.rows.append([fmt(c) for c in cells])

    def markdown(self) -> str:
        return "\n".join(markdown_table(self.columns, self.rows))

    def as_dict(self) -> dict:
        return {"columns": self.columns, "rows": self.rows}


def fmt(value, digits: int = 2) -> str:
    """A cell: None -> "", ints with thousands separators, floats to `digits` decimals (large ones with
    separators), anything else as str."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"
    return str(value)


def markdown_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(row) + " |" for row in rows)]


def describe_input(spec: str) -> str:
    """One line naming an input and its hash: the built-in corpus and models by their known hashes, a local
    file or folder by the sha256 of its contents, anything else by name."""
    from compactlm import data, provenance
    from compactlm.models.loading import BUILTIN_DESCRIPTIONS

    if spec == data.PYTHON_DOCS:
        return f"{spec}: sha256 {data.PYTHON_DOCS_SHA256}"
    if spec in BUILTIN_DESCRIPTIONS:
        return f"{spec}: {BUILTIN_DESCRIPTIONS[spec]}"
    if Path(spec).expanduser().exists():
        count, digest = provenance.path_digest(Path(spec).expanduser())
        return f"{spec}: {count} file(s), sha256 {digest}"
    return f"{spec}: by name (no hash)"


def machine() -> str:
    """CPU model, cores, torch and its CPU capability, threads: what makes numbers differ between machines."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    capability = torch.backends.cpu.get_cpu_capability()
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({capability}), "
            f"{torch.get_num_threads()} threads")


def commit() -> str:
    """The checked-out commit, `+dirty` when the working tree differs from it."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def command(argv: list[str] | None = None) -> str:
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *argv[1:]])


def write_result(name: str, *, figures, tables: dict[str, Table] | None = None, values: dict | None = None,
                 inputs: dict[str, str] | None = None, out: str | Path | None = None) -> Path:
    """Write benchmarks/results/<name>.json (or `out`) and return its path; the write is atomic."""
    result = {"name": name, "command": command(), "commit": commit(),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "machine": machine(),
              "provenance": "measured", "inputs": {k: describe_input(v) for k, v in (inputs or {}).items()},
              "tables": {k: t.as_dict() for k, t in (tables or {}).items()},
              "values": {k: fmt(v) if not isinstance(v, str) else v for k, v in (values or {}).items()},
              "figures": figures}
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)
    for table_id, table in (tables or {}).items():
        print(f"\n{name}/{table_id}:\n{table.markdown()}")
    print(f"\nwrote {path}")
    return path


# ---------------------------------------------------------------- peak memory of this process

def _rss_kib(field: str) -> int | None:
    try:
        return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    except (OSError, AttributeError):
        return None


def reset_peak(device: str) -> int:
    """Reset the memory high-water mark; return the baseline (bytes) the peak is measured against."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        return _rss_kib("VmRSS") * 1024
    except (OSError, TypeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak(device: str, baseline: int) -> int:
    """Bytes above `baseline` (from `reset_peak`) at the high-water mark since."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() - baseline
    hwm = _rss_kib("VmHWM")
    high = hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return high - baseline


def held_out(student, teacher, batches) -> dict:
    """A student's perplexity, KL and top-1 agreement to `teacher` on held-out `batches`; the count of tokens
    measured as eval_tokens (a result's "tokens" are its training tokens)."""
    from compactlm.metrics import perplexity, teacher_agreement

    out = {**perplexity(student, batches), **teacher_agreement(student, teacher, batches)}
    out["eval_tokens"] = out.pop("tokens")
    return out
