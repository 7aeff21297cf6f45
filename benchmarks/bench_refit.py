"""The refit's statistics in float64 (the default) against float32, side by side: prune seconds and the pruned
model's held-out perplexity, SmolLM2-135M (built in: a Q4_1 GGUF, dequantized) cut to the README's shape with
the main command's calibration (configs/smollm2-135m.yaml).

    python benchmarks/bench_refit.py [--eval-sequences 64]

Writes benchmarks/results/refit_precision.json. Scores are computed once and reused by both prunes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import ROOT, Table, write_result

from compactlm import data, inputs, stages
from compactlm.config import load_config
from compactlm.metrics import perplexity
from compactlm.models.loading import load_model
from compactlm.pruning import reconstruct

CONFIG = ROOT / "configs" / "smollm2-135m.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/bench/refit")
    parser.add_argument("--eval-sequences", type=int, default=64)
    args = parser.parse_args()
    run = Path(args.run_dir)
    stages.score(load_config(str(CONFIG), [f"out_dir={run / 'scores'}"]))
    cfg = load_config(str(CONFIG), [f"importance.scores={run / 'scores' / 'scores.safetensors'}"])
    teacher, tokenizer = inputs.load(cfg)
    val = inputs.load_splits(cfg, tokenizer, cfg.eval.seq_len).val[: args.eval_sequences]
    batches = list(data.batches(val, cfg.eval.batch_size))
    rows = []
    for dtype in (torch.float32, torch.float64, torch.float32, torch.float64):  # interleaved: noise shows as spread
        reconstruct.STATS_DTYPE = dtype
        out_dir = run / f"pruned-{str(dtype).removeprefix('torch.')}-{len(rows)}"
        start = time.perf_counter()
        stages.prune(load_config(str(CONFIG), [f"importance.scores={run / 'scores' / 'scores.safetensors'}",
                                                f"out_dir={out_dir}"]))
        seconds = time.perf_counter() - start
        rows.append({"statistics": str(dtype).removeprefix("torch."), "prune_seconds": round(seconds, 1),
                     "perplexity": round(perplexity(load_model(str(out_dir)), batches)["perplexity"], 3)})
        print(rows[-1], flush=True)
    write_result("refit_precision", figures={"validation_tokens": sum(int(b["attention_mask"].sum()) for b in batches),
                                             "rows": rows}, tables={"precision": precision_table(rows)},
                 inputs={"config": str(CONFIG.relative_to(ROOT)), "model": "smollm2-135m", "data": "python-docs"})


def precision_table(rows: list[dict]) -> Table:
    """Each run in the order it ran (interleaved), then the median prune seconds per precision."""
    table = Table(["refit statistics", "prune seconds, with the refit", "pruned held-out perplexity"])
    for r in rows:
        table.add(r["statistics"], f"{r['prune_seconds']:.1f}", f"{r['perplexity']:.3f}")
    for dtype in dict.fromkeys(r["statistics"] for r in rows):
        table.add(f"{dtype}, median", f"{statistics.median(r['prune_seconds'] for r in rows if r['statistics'] == dtype):.1f}", "")
    return table

if __name__ == "__main__":
    main()
