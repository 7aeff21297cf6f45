"""The refit's statistics in float64 (the default) against float32, side by side: prune seconds and the pruned
model's held-out perplexity, SmolLM2-135M (built in: a Q4_1 GGUF, dequantized) cut to the README's shape with
the main command's calibration (configs/smollm2-135m.yaml).

    python benchmarks/bench_refit.py [--eval-sequences 64]

Writes benchmarks/results/refit_precision.json. Scores are computed once and reused by both prunes.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from compactlm import data, inputs, stages
from compactlm.config import load_config
from compactlm.metrics import perplexity
from compactlm.models.loading import load_model
from compactlm.pruning import reconstruct

ROOT = Path(__file__).resolve().parents[1]
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
    print(f"\n{'statistics':<11} {'prune s (with the refit)':>24} {'pruned ppl':>11}")
    for r in rows:
        print(f"{r['statistics']:<11} {r['prune_seconds']:>24} {r['perplexity']:>11}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    out = ROOT / "benchmarks" / "results" / "refit_precision.json"
    out.write_text(json.dumps({"command": "python benchmarks/bench_refit.py", "commit": commit,
                               "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                               "model": "smollm2-135m (Q4_1 GGUF, dequantized)", "validation_tokens": sum(
                                   int(b["attention_mask"].sum()) for b in batches), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
