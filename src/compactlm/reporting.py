"""Run reports: report.md and PNG plots in a run directory.

Plots draw on a bare `matplotlib.figure.Figure` with an Agg canvas (matplotlib imported inside the plot
functions), so no pyplot figure is ever opened and the process-wide backend is left alone. Every function
only writes its own file; a missing piece (no depth metrics, no validation rows, no candidates) gives a plot
that says so instead of an error.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from compactlm.importance.scores import Scores

log = logging.getLogger(__name__)

__all__ = ["plot_width_importance", "plot_layer_importance", "plot_training", "plot_search", "write_report"]

MISSING = "–"
ARCH_FIELDS = ("hidden", "ffn", "heads", "kv_heads", "head_dim", "layers", "vocab", "params")
# metrics-table columns: (title, key in a stage dict, format)
METRIC_COLUMNS = (
    ("params", "params", lambda v: _short(v)),
    ("perplexity", "perplexity", lambda v: f"{v:.2f}"),
    ("KL to teacher", "kl", lambda v: f"{v:.4f}"),
    ("top-1 agreement", "top1_agreement", lambda v: f"{v:.1%}"),
    ("tokens/s", "tokens_per_s", lambda v: f"{v:.1f}"),
)


# ----------------------------------------------------------------------------------------------- plotting


def _figure(cols: int, width: float = 6.0, height: float = 4.0):
    """A pyplot-free figure with an Agg canvas and `cols` axes side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, cols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    log.debug("wrote %s", path)


def _say(ax, text: str) -> None:
    """Replace a panel by a centred message (a piece of the plot is missing)."""
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes)
    ax.set_axis_off()


def _norm(values: torch.Tensor):
    """A log colour scale for positive values spanning > 3 decades (activation norms), else linear."""
    from matplotlib.colors import LogNorm

    finite = values[torch.isfinite(values)]
    if finite.numel() and float(finite.min()) > 0 and float(finite.max()) / float(finite.min()) > 1e3:
        return LogNorm(vmin=float(finite.min()), vmax=float(finite.max()))
    return None


def _heatmap(fig, ax, values: torch.Tensor, title: str, xlabel: str) -> None:
    """(layers, n) values as an image, layer 0 on top."""
    from matplotlib.ticker import MaxNLocator

    if values.ndim != 2 or values.numel() == 0:
        _say(ax, f"{title}: no scores")
        return
    image = ax.imshow(values.numpy(), aspect="auto", interpolation="nearest", cmap="viridis",
                      norm=_norm(values))
    fig.colorbar(image, ax=ax, label="importance")
    ax.set(title=title, xlabel=xlabel, ylabel="layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def plot_width_importance(scores: Scores, path: Path) -> None:
    """Heatmaps: MLP neuron importance (layers, ffn), sorted per layer; head importance (layers, heads)."""
    fig, (ax_ffn, ax_heads) = _figure(2)
    ffn = scores.ffn.detach().float().cpu()
    if ffn.ndim == 2:
        ffn = ffn.sort(dim=1, descending=True).values
    _heatmap(fig, ax_ffn, ffn, "MLP neurons", "neuron rank within layer (most important first)")
    _heatmap(fig, ax_heads, scores.heads.detach().float().cpu(), "attention heads", "head")
    _save(fig, path)


def plot_layer_importance(scores: Scores, path: Path) -> None:
    """Each depth metric of `scores.layers` against layer index, min-max normalised (raw range in legend)."""
    from matplotlib.ticker import MaxNLocator

    fig, (ax,) = _figure(1, width=7.0)
    if not scores.layers:
        _say(ax, "no depth metrics in these scores\n"
                 "(importance.layer_metrics was empty, or a baseline method)")
        _save(fig, path)
        return
    for name, values in scores.layers.items():
        v = values.detach().double().cpu().flatten()  # (layers,) or (layers - n + 1,) for n-layer blocks
        lo, hi = float(v.min()), float(v.max())
        scaled = (v - lo) / (hi - lo) if hi > lo else torch.full_like(v, 0.5)
        ax.plot(range(len(v)), scaled.numpy(), marker="o", label=f"{name} [{lo:.3g}, {hi:.3g}]")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title="layer importance (higher = more important)", xlabel="layer (first layer of a block)",
           ylabel="min-max normalised")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    _save(fig, path)


def _read_rows(path: Path) -> list[dict]:
    """The JSON object lines of a metrics.jsonl; unreadable files and torn lines are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        log.warning("plot_training: cannot read %s (%s)", path, e.strerror)
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(tokens, value) of the rows that carry a finite numeric `key`, in step order."""
    pts = [(r.get("step", 0), r["tokens"], r[key]) for r in rows
           if isinstance(r.get(key), (int, float)) and isinstance(r.get("tokens"), (int, float))
           and math.isfinite(r[key])]
    pts.sort(key=lambda p: p[0])
    return [p[1] for p in pts], [p[2] for p in pts]


def plot_training(metrics_jsonl: Path | Sequence[Path], path: Path) -> None:
    """Train loss, and validation loss (rows with val_loss), against tokens; a line per run (folder name)."""
    paths = [metrics_jsonl] if isinstance(metrics_jsonl, (str, os.PathLike)) else list(metrics_jsonl)
    names = [Path(p).parent.name or Path(p).stem for p in paths]
    # runs in same-named folders (a cascade's size-<i>/distill) go by the folder above
    labels = [n if names.count(n) == 1 else Path(p).parent.parent.name for n, p in zip(names, paths)]
    fig, axes = _figure(2)
    for ax, key, title in zip(axes, ("loss", "val_loss"), ("training loss", "validation loss")):
        drawn = 0
        for i, p in enumerate(paths):
            tokens, values = _series(_read_rows(Path(p)), key)
            if tokens:
                ax.plot(tokens, values, color=f"C{i}", marker="o" if key == "val_loss" else None,
                        markersize=3, linewidth=1.2 if key == "val_loss" else 0.8, label=labels[i])
                drawn += 1
        if not drawn:
            _say(ax, f"{title}: no rows with '{key}'")
            continue
        ax.set(title=title, xlabel="tokens", ylabel=f"{key} (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    _save(fig, path)


def _dims_label(candidate: Mapping) -> str:
    d = candidate.get("dims") or {}
    keys = (("layers", "L"), ("hidden", "h"), ("ffn", "ffn"), ("heads", "H"), ("kv_heads", "kv"))
    return " ".join(f"{short}{d[k]}" for k, short in keys if k in d)


def _is_chosen(candidate: Mapping) -> bool:
    return bool(candidate.get("chosen")) or candidate.get("rank") == 1


def plot_search(candidates: list[dict], path: Path) -> None:
    """Parameters (M) against zero-shot validation loss, and distilled loss where present; chosen one starred.

    Candidates are `search.Candidate.to_json()` dicts: params, zero_shot_loss, distilled_loss,
    rank (1 = chosen) or chosen, dims.
    """
    fig, (ax,) = _figure(1, width=7.0)
    num = lambda c, k: isinstance(c.get(k), (int, float)) and math.isfinite(c[k])  # noqa: E731
    shown = [c for c in candidates
             if num(c, "params") and (num(c, "zero_shot_loss") or num(c, "distilled_loss"))]
    if not shown:
        _say(ax, "no search candidates with a parameter count and a validation loss")
        _save(fig, path)
        return
    for key, marker, label in (("zero_shot_loss", "o", "zero-shot (pruned)"),
                               ("distilled_loss", "^", "after short distillation")):
        pts = [(c["params"] / 1e6, c[key]) for c in shown if num(c, key)]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, label=label, alpha=0.8)
    for c in shown:  # join a candidate's two losses
        if num(c, "zero_shot_loss") and num(c, "distilled_loss"):
            ax.plot([c["params"] / 1e6] * 2, [c["zero_shot_loss"], c["distilled_loss"]], color="grey", lw=0.6)
    for c in (c for c in shown if _is_chosen(c)):
        loss = c["distilled_loss"] if num(c, "distilled_loss") else c["zero_shot_loss"]
        ax.scatter([c["params"] / 1e6], [loss], marker="*", s=250, color="red", zorder=3,
                   label=f"chosen {_dims_label(c)}".strip())
    ax.set(title="architecture search", xlabel="parameters (M)", ylabel="validation loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)


# ------------------------------------------------------------------------------------------------ report.md


def _short(n: float) -> str:
    """A parameter count as 134.5M / 1.24B / 52.3K."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.{2 if suffix == 'B' else 1}f}{suffix}"
    return str(int(n))


def _cell(value, fmt=str) -> str:
    """A table cell: MISSING for None/NaN/absent, else `fmt(value)` with pipes escaped."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    try:
        text = fmt(value)
    except (TypeError, ValueError):  # e.g. a string where a number was expected
        text = value
    return str(text).replace("|", "\\|")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _architecture(teacher: Mapping, student: Mapping) -> list[str]:
    """Side-by-side teacher / student shape, with student / teacher ratios."""
    def ratio(field: str) -> str:
        t, s = teacher.get(field), student.get(field)
        ok = isinstance(t, (int, float)) and isinstance(s, (int, float)) and t
        return f"{s / t:.1%}" if ok else MISSING

    fmt = lambda f: (lambda v: f"{v:,}") if f == "params" else str  # noqa: E731
    rows = ([f, _cell(teacher.get(f), fmt(f)), _cell(student.get(f), fmt(f)), ratio(f)] for f in ARCH_FIELDS)
    return _table(["", "teacher", "student", "student / teacher"], rows)


def _task_columns(stages: Mapping[str, Mapping]) -> list[tuple[str, str]]:
    """(task, metric) pairs in order of first appearance; stderr metrics fold into their metric's cell."""
    cols: dict[tuple[str, str], None] = {}
    for stage in stages.values():
        for task, metrics in (stage.get("tasks") or {}).items():
            for metric in metrics:
                if not metric.split(",")[0].endswith("_stderr"):
                    cols[(task, metric)] = None
    return list(cols)


def _task_cell(stage: Mapping, task: str, metric: str) -> str:
    metrics = (stage.get("tasks") or {}).get(task) or {}
    value = metrics.get(metric)
    name, _, filt = metric.partition(",")
    stderr = metrics.get(f"{name}_stderr" + (f",{filt}" if filt else ""))
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return _cell(value)
    with_err = isinstance(stderr, (int, float)) and math.isfinite(stderr) and stderr > 0
    return f"{value:.3f}" + (f" ± {stderr:.3f}" if with_err else "")


def _metrics(stages: Mapping[str, Mapping]) -> list[str]:
    tasks = _task_columns(stages)
    header = ["stage"] + [title for title, _, _ in METRIC_COLUMNS] + [f"{t} {m}" for t, m in tasks]
    rows = ([_cell(name)] + [_cell(stage.get(key), fmt) for _, key, fmt in METRIC_COLUMNS]
            + [_task_cell(stage, t, m) for t, m in tasks] for name, stage in stages.items())
    return _table([_cell(h) for h in header], rows)


def _plots(run_dir: Path, plots: Mapping[str, str]) -> list[str]:
    """Embedded images for the plots whose files exist, linked relative to run_dir."""
    lines = []
    for title, name in plots.items():
        target = run_dir / name  # an absolute `name` stays absolute
        if not target.is_file():
            log.debug("report: plot %s (%s) not found, not embedded", title, target)
            continue
        link = Path(os.path.relpath(target, run_dir)).as_posix()
        lines += [f"### {title}", "", f"![{title}]({link})", ""]
    return ["## Plots", "", *lines] if lines else []


def _samples(samples: Mapping[str, str]) -> list[str]:
    lines = ["## Samples", ""]
    for name, text in samples.items():
        longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
        fence = "`" * max(3, longest + 1)  # longer than any backtick run inside the text
        lines += [f"**{name}**", "", f"{fence}text", text, fence, ""]
    return lines


def _speeds(stages: Mapping[str, Mapping]) -> list[str]:
    """Generation tokens/s per KV-cache mode and batch size (eval.speed_modes x eval.speed_batches), one
    column per stage and the last stage against the first; nothing when only the default was measured."""
    keys = list(dict.fromkeys(k for stage in stages.values() for k in stage.get("speeds") or {}))
    if len(keys) < 2:
        return []
    names = list(stages)
    first, last = names[0], names[-1]

    def ratio(key: str) -> str:
        a, b = (stages[first].get("speeds") or {}).get(key), (stages[last].get("speeds") or {}).get(key)
        return f"{b / a:.2f}x" if a and b else MISSING

    rows = ([key] + [_cell((stage.get("speeds") or {}).get(key), lambda v: f"{v:.1f}") for stage in stages.values()]
            + [ratio(key)] for key in keys)
    return ["## Generation speed (tokens/s)", "", *_table(["KV cache, batch", *names, f"{last} / {first}"], rows), ""]


def _export(exported: Mapping, run_dir: Path) -> list[str]:
    path = Path(exported["gguf"])
    if path.resolve().is_relative_to(run_dir.resolve()):  # the run's own export: relative, like the plots
        path = path.resolve().relative_to(run_dir.resolve())
    rows = [(f"`{path.as_posix()}`", exported["type"], f"{exported['bytes'] / 2**20:,.1f} MiB",
             str(len(exported.get("kept_f16", []))))]
    return ["## GGUF export", "", *_table(["file", "type", "size", "matrices kept f16"], rows), ""]


def _inputs(inputs: Sequence[str]) -> list[str]:
    return ["## Inputs", "", *(f"- {line}" for line in inputs), ""] if inputs else []


def write_report(run_dir: Path, *, teacher: dict, student: dict, stages: dict[str, dict],
                 plots: dict[str, str], samples: dict[str, str] | None = None,
                 notes: Sequence[str] = (), exported: Mapping | None = None, inputs: Sequence[str] = ()) -> Path:
    """Write run_dir/report.md (its inputs, architectures, metrics per stage, the GGUF export, plots, samples,
    notes); `inputs`: provenance lines (`provenance.recorded`)."""
    run_dir = Path(run_dir)
    lines = [f"# compactlm report: {run_dir.resolve().name}", "", *_inputs(inputs), "## Architecture", "",
             *_architecture(teacher, student), "", "## Metrics", "", *_metrics(stages), ""]
    lines += _speeds(stages)
    if exported:
        lines += _export(exported, run_dir)
    lines += _plots(run_dir, plots)
    if samples:
        lines += _samples(samples)
    if notes:
        lines += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "report.md"
    path.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    log.info("wrote %s", path)
    return path


def write_cascade_report(run_dir: Path, *, teacher: dict, sizes: dict[str, dict], plots: dict[str, str],
                         inputs: Sequence[str] = ()) -> Path:
    """run_dir/report.md of a cascade: a row per size (its shape, and its metrics pruned and then distilled), the
    teacher's row, the plots, and links to each size's own report. `sizes`: folder -> its eval.json results."""
    run_dir = Path(run_dir)
    header = ["model", "layers", "hidden", "heads", "ffn", "params", "pruned perplexity", "perplexity",
              "KL to teacher", "top-1 agreement", "tokens/s"]

    def row(name: str, result: Mapping, pruned: Mapping | None) -> list[str]:
        d = result.get("dims") or {}
        return [name, *(_cell(d.get(k)) for k in ("layers", "hidden", "heads", "ffn")),
                _cell(result.get("params"), _short),
                _cell((pruned or {}).get("perplexity"), lambda v: f"{v:.2f}")] + [
            _cell(result.get(key), fmt) for _, key, fmt in METRIC_COLUMNS[1:]]

    rows = [row("teacher", teacher, None)] + [row(f"[{name}]({name}/report.md)", r["distilled"], r["pruned"])
                                               for name, r in sizes.items()]
    lines = [f"# compactlm cascade report: {run_dir.resolve().name}", "",
             "Each size is pruned from the one above it (the first from the teacher) and distilled from the teacher; "
             "perplexity, KL and agreement are after distillation, on the same held-out text.", "",
             *_inputs(inputs), *_table(header, rows), "", *_plots(run_dir, plots)]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    log.info("wrote %s", path)
    return path
