"""Dense KD against KD from the teacher's cached top-K targets (distill.teacher_top_k), on the pruned SmolLM2.

    python benchmarks/bench_teacher_cache.py --student runs/main/prune

Each run distils the same student (default: the README main command's pruned model; `python
benchmarks/main_command.py --keep runs/main` leaves it) from the same teacher on the same rows in the same order
for --steps steps of 8 x 256 tokens (AdamW, LR 1e-3 cosine to 1e-4): dense KD, the top-K targets at each --ks,
the sampled targets (K draws, distill.teacher_targets=sampled) at each --sampled, and a rerun of each --reuse on
the cache its first run built (what a rerun, a resume or a second size of a cascade pays). Resumes: a run whose
row is in --run-dir is not timed again (--fresh times them all). Printed side by side:
held-out perplexity after, median seconds per step (the cached runs do not run the teacher in a step), the whole
run's wall time (a first cached run includes building its cache) and bytes per token. Run alone: other processes
on the cores change the times.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

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
    parser.add_argument("--sampled", default="64", help="draws K of the sampled targets to compare (empty: none)")
    parser.add_argument("--reuse", default="top-64,sampled-64",
                        help="runs to repeat on the cache their first run built (empty: none)")
    parser.add_argument("--fresh", action="store_true", help="time every run again (default: resume finished ones)")
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
    runs = [("dense", 0, "top_k")] + [(f"top-{k}", k, "top_k") for k in map(int, args.ks.split(","))]
    runs += [(f"sampled-{k}", k, "sampled") for k in map(int, filter(None, args.sampled.split(",")))]
    for first in filter(None, args.reuse.split(",")):  # a rerun on the cache that run built
        runs.append((f"{first}, existing cache", int(first.rpartition("-")[2]), first.rpartition("-")[0].replace("-", "_")))
    rows = []
    for name, k, targets in runs:
        reuse = name.endswith("existing cache")
        run = Path(args.run_dir) / (name.split(",")[0] + ("-reuse" if reuse else ""))
        done = run / "row.json"
        if done.is_file() and not args.fresh:  # resumes: a finished run is not timed again
            rows.append(json.loads(done.read_text()))
            print(rows[-1], flush=True)
            continue
        shutil.rmtree(run, ignore_errors=True)  # timed from scratch: the cache is built inside the run, unless reused
        folder = Path(args.run_dir) / name.split(",")[0] / "teacher_cache" if reuse else run / "teacher_cache"
        start = time.perf_counter()
        stages.distill(load_config(None, base + budget + [
            f"out_dir={run}", f"distill.teacher_top_k={k}", f"distill.teacher_targets={targets}",
            f"distill.teacher_cache={folder}"]))
        wall = time.perf_counter() - start
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        step_s = statistics.median(2048 / r["tokens_per_s"] for r in steps[1:])  # the first step warms up
        shards = list(folder.glob("*/shard-*.safetensors")) if k else []
        cached = sum(_tokens_in(p) for p in shards)  # every train row the run loaded, not only those it used
        after = perplexity(load_model(str(run / "final")), batches)["perplexity"]
        row = {"kd": name, "perplexity": after, "step_s": step_s, "wall_s": wall, "built_cache": bool(k) and not reuse,
               "cache_bytes": sum(p.stat().st_size for p in shards), "cached_tokens": cached}
        row["cache_bytes_per_token"] = row["cache_bytes"] / cached if cached else 0
        if targets == "sampled":
            row["distinct_per_token"] = _distinct_per_token(shards)
        done.write_text(json.dumps(row, indent=1) + "\n")
        rows.append(row)
        print(row, flush=True)
    dense = rows[0]
    print(f"\n{args.steps} steps of 8 x 256 tokens each; held-out perplexity on "
          f"{sum(len(b['input_ids']) for b in batches)} validation rows")
    table = Table(["KD", "held-out perplexity", "vs dense", "seconds per step", "step speed-up", "run wall",
                   "run speed-up", "cache bytes per token"])
    for r in rows:
        wall = f"{r['wall_s']:.0f} s" + (" (builds its cache)" if r["built_cache"] else "")
        versus = f"{r['perplexity'] / dense['perplexity'] - 1:+.1%}" if r is not dense else ""
        table.add(r["kd"], f"{r['perplexity']:.2f}", versus,
                  f"{r['step_s']:.2f}", f"{dense['step_s'] / r['step_s']:.2f}x", wall,
                  f"{dense['wall_s'] / r['wall_s']:.2f}x",
                  f"{r['cache_bytes_per_token']:,.0f}" if r["cache_bytes_per_token"] else "")
    write_result("teacher_cache", figures={"steps": args.steps, "rows": rows}, tables={"kd": table}, out=args.out,
                 inputs={"student": args.student, "teacher": "smollm2-135m", "data": "python-docs"})


def _distinct_per_token(shards: list[Path]) -> float:
    """The mean number of distinct tokens that sampled targets keep per position (slots with probability > 0)."""
    from safetensors.torch import load_file

    kept = [(load_file(str(p))["logp"].float() > torch.finfo(torch.float16).min).sum(-1).float() for p in shards]
    return float(torch.cat([k.reshape(-1) for k in kept]).mean())


if __name__ == "__main__":
    main()
