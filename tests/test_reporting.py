"""Report: every plot writes a valid PNG without leaving figures open; report.md holds the right numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from compactlm.importance.scores import Scores
from compactlm.reporting import (
    MISSING,
    plot_layer_importance,
    plot_search,
    plot_training,
    plot_width_importance,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    import matplotlib.pyplot as plt

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    assert b"IEND" in data[-12:]
    assert plt.get_fignums() == [], "a pyplot figure was left open"


def _scores(layers: dict | None = None) -> Scores:
    torch.manual_seed(0)
    n = 4
    default = {"lm_loss": torch.rand(n), "block_importance": torch.rand(n) * 0.1,
               "contiguous_2": torch.rand(n - 1)}
    return Scores(hidden=torch.rand(32), heads=torch.rand(n, 4), ffn=torch.rand(n, 48).pow(8),
                  layers=default if layers is None else layers)


def test_plot_width_importance(tmp_path):
    plot_width_importance(_scores(), tmp_path / "width.png")
    _assert_png(tmp_path / "width.png")


def test_plot_width_importance_heavy_tailed_scores(tmp_path):
    """Activation norms span many decades: the log colour scale must still draw."""
    scores = Scores(hidden=torch.rand(8), heads=torch.rand(2, 2) * 1e4 + 1e-3,
                    ffn=torch.logspace(-6, 3, 16).repeat(2, 1))
    plot_width_importance(scores, tmp_path / "width.png")
    _assert_png(tmp_path / "width.png")


@pytest.mark.parametrize("layers", [None, {}, {"lm_loss": torch.ones(4)}],
                         ids=["metrics", "none", "constant"])
def test_plot_layer_importance(tmp_path, layers):
    plot_layer_importance(_scores(layers), tmp_path / "sub" / "layers.png")
    _assert_png(tmp_path / "sub" / "layers.png")


def _metrics_file(folder: Path, steps: int = 10, torn: bool = False) -> Path:
    folder.mkdir(parents=True)
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "tokens": step * 512, "loss": 5.0 / step, "lr": 1e-4}
        if step % 5 == 0:
            row |= {"val_loss": 4.0 / step, "val_ppl": 2.0}
        rows.append(json.dumps(row))
    path = folder / "metrics.jsonl"
    path.write_text("\n".join(rows) + ("\n{\"step\": 11, \"tok" if torn else "\n"))
    return path


def test_plot_training_several_runs(tmp_path):
    paths = [_metrics_file(tmp_path / "distill"), _metrics_file(tmp_path / "train-ce", torn=True)]
    plot_training(paths, tmp_path / "training.png")
    _assert_png(tmp_path / "training.png")


def test_plot_training_without_validation_or_file(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"step": 1, "tokens": 64, "loss": 3.0}) + "\n")
    plot_training(path, tmp_path / "one.png")
    _assert_png(tmp_path / "one.png")
    plot_training([tmp_path / "absent" / "metrics.jsonl"], tmp_path / "none.png")
    _assert_png(tmp_path / "none.png")


def _candidate(params: int, zero_shot: float, distilled: float | None = None,
               rank: int | None = None) -> dict:
    dims = {"hidden": 32, "ffn": 48, "heads": 4, "kv_heads": 2, "head_dim": 8, "layers": 3, "vocab": 64}
    return {"dims": dims, "params": params, "latency_ms": None, "zero_shot_loss": zero_shot,
            "distilled_loss": distilled, "rank": rank}


@pytest.mark.parametrize("distilled", [True, False])
def test_plot_search(tmp_path, distilled):
    cands = [_candidate(70_000_000 + i * 1_000_000, 6.0 - 0.1 * i,
                        (4.0 - 0.05 * i) if distilled and i < 3 else None, rank=i + 1) for i in range(5)]
    plot_search(cands, tmp_path / "search.png")
    _assert_png(tmp_path / "search.png")


def test_plot_search_empty(tmp_path):
    plot_search([], tmp_path / "search.png")
    _assert_png(tmp_path / "search.png")


TEACHER = {"hidden": 576, "ffn": 1536, "heads": 9, "kv_heads": 3, "head_dim": 64, "layers": 30,
           "vocab": 49152, "params": 134_515_008}
STUDENT = {"hidden": 384, "ffn": 1024, "heads": 6, "kv_heads": 3, "head_dim": 64, "layers": 30,
           "vocab": 49152, "params": 70_123_456}


def _table_rows(text: str, first_cell: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]


def test_write_report_tables_and_links(tmp_path):
    run = tmp_path / "run"
    plot_layer_importance(_scores(), run / "layers.png")
    stages = {
        "teacher": {"params": 134_515_008, "perplexity": 12.3456, "tokens_per_s": 41.25,
                    "tasks": {"hellaswag": {"acc": 0.4123, "acc_stderr": 0.01, "acc_norm": 0.5}}},
        "pruned": {"params": 70_123_456, "perplexity": 912.5, "kl": 2.34567, "top1_agreement": 0.4321},
        "distilled": {"params": 70_123_456, "perplexity": 25.0, "kl": 0.5, "top1_agreement": 0.75,
                      "tokens_per_s": 80.0, "tasks": {"hellaswag": {"acc": 0.3}}},
    }
    path = write_report(run, teacher=TEACHER, student=STUDENT, stages=stages,
                        plots={"layer importance": "layers.png", "training": "training.png"},
                        samples={"distilled": "To be, or not ```to``` be"}, notes=["tiny run"])
    assert path == run / "report.md"
    text = path.read_text()
    assert _table_rows(text, "params")[0] == ["params", "134,515,008", "70,123,456", "52.1%"]
    assert _table_rows(text, "hidden")[0] == ["hidden", "576", "384", "66.7%"]
    assert _table_rows(text, "kv_heads")[0] == ["kv_heads", "3", "3", "100.0%"]
    header = _table_rows(text, "stage")[0]
    assert header == ["stage", "params", "perplexity", "KL to teacher", "top-1 agreement", "tokens/s",
                      "hellaswag acc", "hellaswag acc_norm"]
    assert _table_rows(text, "teacher")[0] == ["teacher", "134.5M", "12.35", MISSING, MISSING, "41.2",
                                               "0.412 ± 0.010", "0.500"]
    assert _table_rows(text, "pruned")[0] == ["pruned", "70.1M", "912.50", "2.3457", "43.2%", MISSING,
                                              MISSING, MISSING]
    assert _table_rows(text, "distilled")[0][1:] == ["70.1M", "25.00", "0.5000", "75.0%", "80.0", "0.300",
                                                     MISSING]
    assert "![layer importance](layers.png)" in text
    assert "training.png" not in text, "a plot whose file does not exist must not be linked"
    assert "````text\nTo be, or not ```to``` be\n````" in text
    assert "- tiny run" in text


def test_write_report_minimal(tmp_path):
    path = write_report(tmp_path / "new", teacher={}, student={"params": 10}, stages={}, plots={})
    text = path.read_text()
    assert text.startswith("# compactlm report: new")
    assert "## Plots" not in text and "## Samples" not in text and "## Notes" not in text
    assert _table_rows(text, "params")[0] == ["params", MISSING, "10", MISSING]


def test_write_report_generation_speed_table(tmp_path):
    """Several KV-cache modes and batch sizes give their own table, the last stage against the first; the
    default single measurement does not."""
    stages = {
        "teacher": {"tokens_per_s": 40.0, "speeds": {"dynamic b1": 40.0, "static b8": 200.0, "compiled b1": None}},
        "pruned": {"speeds": {"dynamic b1": 70.0, "static b8": 350.0}},
        "distilled": {"tokens_per_s": 72.0, "speeds": {"dynamic b1": 72.0, "static b8": 360.0, "compiled b1": 90.0}},
    }
    text = write_report(tmp_path, teacher=TEACHER, student=STUDENT, stages=stages, plots={}).read_text()
    assert "## Generation speed (tokens/s)" in text
    assert _table_rows(text, "KV cache, batch")[0] == ["KV cache, batch", "teacher", "pruned", "distilled",
                                                       "distilled / teacher"]
    assert _table_rows(text, "static b8")[0] == ["static b8", "200.0", "350.0", "360.0", "1.80x"]
    assert _table_rows(text, "compiled b1")[0] == ["compiled b1", MISSING, MISSING, "90.0", MISSING]
    one = {name: {"speeds": {"dynamic b1": 1.0}} for name in stages}
    assert "Generation speed" not in write_report(tmp_path, teacher=TEACHER, student=STUDENT, stages=one,
                                                  plots={}).read_text()
