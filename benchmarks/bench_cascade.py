"""Cascade against direct pruning at the same total distillation tokens (P1: 15B -> 8B -> 4B beats 15B -> 4B).

    python benchmarks/bench_cascade.py [--steps 40]

SmolLM2-135M to about 25% of its parameters (hidden 288, 3 heads, one per KV group, ffn 512, 30 layers: 34.1M),
two ways, each a `compactlm run` with the default recipe (activation importance, refit):
- direct: pruned from the teacher to 25%, distilled --steps steps;
- cascade: pruned to 50% (the README's shape: hidden 384, 6 heads, ffn 1024; 67.6M), distilled --steps / 2
  steps, that model pruned to 25%, distilled --steps / 2 steps (its own scores: it is the model being cut).
Every distillation is from the teacher, 8 x 256 tokens a step, AdamW, LR 1e-3 cosine to 1e-4, so both spend
the same tokens. Held-out perplexity, KL and top-1 agreement by each run's evaluate stage on the same rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import README_SHAPE, Table, kd_keys, write_result

from compactlm import pipeline
from compactlm.config import load_config

COMMON = ["model=smollm2-135m", "data=python-docs", "seed=0", "calib.sequences=64", "eval.sequences=64",
          "eval.speed=false", *kd_keys(eval_sequences=16)]
QUARTER = {"hidden_size": 288, "num_attention_heads": 3, "intermediate_size": 512}
HALF = README_SHAPE


def run(name: str, overrides: list[str], run_dir: Path) -> dict:
    start = time.perf_counter()
    pipeline.run(load_config(None, COMMON + overrides + [f"out_dir={run_dir / name}"]))
    return {"wall_s": round(time.perf_counter() - start, 1)}


def results_of(folder: Path) -> dict:
    r = json.loads((folder / "evaluate" / "eval.json").read_text())
    return {"params": r["distilled"]["params"], "pruned": r["pruned"]["perplexity"],
            "distilled": r["distilled"]["perplexity"], "kl": r["distilled"]["kl"],
            "top1": r["distilled"]["top1_agreement"], "teacher": r["teacher"]["perplexity"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="distillation steps in all, per way")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench/cascade"))
    parser.add_argument("--out", help="write the results here instead of benchmarks/results/cascade.json")
    args = parser.parse_args()
    if args.steps % 2:
        parser.error("--steps must be even (the cascade spends half at each size)")

    direct = run("direct", [f"target.{k}={v}" for k, v in QUARTER.items()] + [f"distill.steps={args.steps}"],
                 args.run_dir)
    direct |= results_of(args.run_dir / "direct")
    cascade = run("cascade", [f"target.{k}=[{HALF[k]},{v}]" for k, v in QUARTER.items()]
                  + [f"distill.steps={args.steps // 2}"], args.run_dir)
    sizes = [results_of(args.run_dir / "cascade" / f"size-{i}") for i in (1, 2)]
    cascade |= sizes[1] | {"half": sizes[0]}

    tokens = args.steps * 8 * 256
    print(f"\nSmolLM2-135M (teacher held-out perplexity {direct['teacher']:.2f}) to {direct['params'] / 1e6:.1f}M "
          f"parameters, {tokens:,} distillation tokens in all each way")
    table = Table(["way", "params", "pruned perplexity", "distilled perplexity", "KL to teacher", "top-1 agreement"])
    half = cascade["half"]
    for name, r in ((f"cascade, size 1 (50%, {args.steps // 2} steps)", half),
                    (f"cascade, size 2 (25%, {args.steps // 2} steps)", cascade), (f"direct (25%, {args.steps} steps)", direct)):
        table.add(name, f"{r['params'] / 1e6:.1f}M", f"{r['pruned']:,.1f}", f"{r['distilled']:.2f}", f"{r['kl']:.3f}",
                  f"{r['top1']:.1%}")
    write_result("cascade", figures={"steps": args.steps, "tokens": tokens, "direct": direct, "cascade": cascade},
                 tables={"sizes": table}, inputs={"model": "smollm2-135m", "data": "python-docs"}, out=args.out)


if __name__ == "__main__":
    main()
