"""Recover the pruned SmolLM2 (hidden 384, 6 heads, ffn 1024) three ways at the same token budget and print
held-out perplexity side by side: distillation from the teacher, cross-entropy retraining, and the same
architecture trained from random init (P1 Table 11's comparison).

    python benchmarks/distill_smollm2.py [--tokens 160000]

Starts from the activation-pruned model in --pruned, weights sliced as in P1 (it prunes one if absent).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import TARGET, Table, kd_keys, write_result

from compactlm import data, inputs, stages
from compactlm.config import load_config
from compactlm.metrics import perplexity
from compactlm.models.loading import load_model
from compactlm.stages import distill as run_distill
from compactlm.stages import train as run_train



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pruned", default="runs/bench/distill_smollm2/pruned")
    parser.add_argument("--run-dir", default="runs/bench/distill_smollm2")
    parser.add_argument("--tokens", type=int, default=160_000)  # docs/RESULTS.md's budget
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-sequences", type=int, default=64)
    parser.add_argument("--out", help="write the results here instead of benchmarks/results/distill_smollm2.json")
    args = parser.parse_args()

    base = ["data=python-docs", "eval.seq_len=256", "resume=true"]
    if not (Path(args.pruned) / "config.json").is_file():
        stages.prune(load_config(None, base + TARGET + ["model=smollm2-135m", f"out_dir={args.pruned}",
                                                        "prune.reconstruct=none"]))  # the start its table shows
    budget = [key for s in ("distill", "train") for key in kd_keys(
        s, tokens=args.tokens, lr=args.lr, min_lr=args.lr / 10, eval_every=0, save_every=20, eval_sequences=16)]
    runs = {
        "distillation (KL) from the teacher": lambda out: run_distill(load_config(None, base + budget + [
            "teacher=smollm2-135m", f"student={args.pruned}", f"out_dir={out}"])),
        "cross-entropy retraining": lambda out: run_train(load_config(None, base + budget + [
            f"model={args.pruned}", f"out_dir={out}"])),
        "random init, cross-entropy": lambda out: run_train(load_config(None, base + budget + [
            f"model={args.pruned}", f"out_dir={out}", "init=random"])),
    }
    cfg = load_config(None, base + ["model=smollm2-135m"])
    tokenizer = inputs.load(cfg)[1]
    val = inputs.load_splits(cfg, tokenizer, cfg.eval.seq_len).val[: args.eval_sequences]
    batches = list(data.batches(val, cfg.eval.batch_size))
    rows = [{"model": "pruned, before retraining", "seconds": 0.0, **perplexity(load_model(args.pruned), batches)}]
    for (name, fn), folder in zip(runs.items(), ("kd", "ce", "scratch")):
        out = Path(args.run_dir) / folder
        start = time.perf_counter()
        fn(out)
        rows.append({"model": name, "seconds": time.perf_counter() - start,
                     **perplexity(load_model(str(out / "final")), batches)})

    table = Table([f"student (67.6M params), {args.tokens:,} training tokens each", "held-out perplexity", "wall time"])
    for r in rows:
        table.add(r["model"], f"{r['perplexity']:,.1f}", f"{r['seconds'] / 60:.1f} min" if r["seconds"] else "")
    write_result("distill_smollm2", figures={"tokens": args.tokens, "lr": args.lr, "rows": rows},
                 tables={"recovery": table}, inputs={"pruned": args.pruned, "teacher": "smollm2-135m", "data": "python-docs"},
                 out=args.out)

if __name__ == "__main__":
    main()
