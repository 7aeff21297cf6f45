"""Dense KD against KD from the teacher's cached top-K targets (distill.teacher_top_k), on the pruned SmolLM2.

    python benchmarks/bench_teacher_cache.py --student runs/main/prune

Each run distils the same student (default: the README main command's pruned model; `python
benchmarks/main_command.py --keep runs/main` leaves it) from the same teacher on the same rows in the same order
for --steps steps of 8 x 256 tokens (AdamW, LR 1e-3 cosine to 1e-4). Printed side by side: held-out perplexity
after, median seconds per step (the cached runs do not run the teacher in a step), the cache's build time and
bytes per token. Run alone: other processes on the cores change the step times.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from common import Table, kd_keys, write_result

from compactlm import data, inputs, stages
from compactlm.config import load_config
from compactlm.metrics import perplexity
from compactlm.models.loading import load_model


def _tokens_in(shard: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as f:
        rows, seq_len, _ = f.get_slice("ids").get_shape()
    return rows * seq_len


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="runs/main/prune")
    parser.add_argument("--run-dir", default="runs/bench/teacher_cache")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--ks", default="16,64,256", help="top-K values to compare with dense KD")
    parser.add_argument("--eval-sequences", type=int, default=64)
    parser.add_argument("--out", help="write the results here instead of benchmarks/results/teacher_cache.json")
    args = parser.parse_args()
    if not Path(args.student, "config.json").is_file():
        raise SystemExit(f"--student {args.student}: no checkpoint there (python benchmarks/main_command.py --keep runs/main)")
    base = ["data=python-docs", "seed=0", "teacher=smollm2-135m", f"student={args.student}"]
    cfg = load_config(None, base)
    teacher, tokenizer = inputs.load(cfg, "smollm2-135m")
    batches = list(data.batches(inputs.load_splits(cfg, tokenizer, 256).val[: args.eval_sequences], 8))
    del teacher
    budget = kd_keys(steps=args.steps, eval_every=0, save_every=args.steps, eval_sequences=16)
    rows = []
    for k in [0, *map(int, args.ks.split(","))]:
        run = Path(args.run_dir) / (f"top{k}" if k else "dense")
        shutil.rmtree(run, ignore_errors=True)  # timed from scratch: the cache is built inside the run
        start = time.perf_counter()
        stages.distill(load_config(None, base + budget + [f"out_dir={run}", f"distill.teacher_top_k={k}"]))
        wall = time.perf_counter() - start
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        step_s = statistics.median(2048 / r["tokens_per_s"] for r in steps[1:])  # the first step warms up
        shards = list((run / "teacher_cache").glob("*/shard-*.safetensors")) if k else []
        cached = sum(_tokens_in(p) for p in shards)  # every train row the run loaded, not only those it used
        after = perplexity(load_model(str(run / "final")), batches)["perplexity"]
        row = {"kd": f"top-{k}" if k else "dense", "perplexity": after, "step_s": step_s, "wall_s": wall,
               "cache_bytes": sum(p.stat().st_size for p in shards), "cached_tokens": cached}
        row["cache_bytes_per_token"] = row["cache_bytes"] / cached if cached else 0
        rows.append(row)
        print(row, flush=True)
    dense = rows[0]
    print(f"\n{args.steps} steps of 8 x 256 tokens each; held-out perplexity on "
          f"{sum(len(b['input_ids']) for b in batches)} validation rows")
    table = Table(["KD", "held-out perplexity", "vs dense", "seconds per step", "speed-up", "run wall, with the cache build",
                   "cache bytes per token"])
    for r in rows:
        table.add(r["kd"], f"{r['perplexity']:.2f}", f"{r['perplexity'] / dense['perplexity'] - 1:+.1%}" if r is not dense else "",
                  f"{r['step_s']:.2f}", f"{dense['step_s'] / r['step_s']:.2f}x", f"{r['wall_s']:.0f} s",
                  f"{r['cache_bytes_per_token']:,.0f}" if r["cache_bytes_per_token"] else "")
    write_result("teacher_cache", figures={"steps": args.steps, "rows": rows}, tables={"kd": table}, out=args.out,
                 inputs={"student": args.student, "teacher": "smollm2-135m", "data": "python-docs"})

if __name__ == "__main__":
    main()
