"""Recover the pruned SmolLM2 (hidden 384, 6 heads, ffn 1024) three ways at the same token budget and print
held-out perplexity side by side: distillation from the teacher, cross-entropy retraining, and the same
architecture trained from random init (P1 Table 11's comparison).

    python benchmarks/distill_smollm2.py --tokens 300000 --out runs/bench/distill_smollm2.json

Expects the activation-pruned model of benchmarks/prune_smollm2.py in --pruned (it prunes one if absent).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from compactlm import data, inputs, stages
from compactlm.config import load_config
from compactlm.metrics import perplexity
from compactlm.models.loading import load_model
from compactlm.stages import distill as run_distill
from compactlm.stages import train as run_train

TARGET = ["target.hidden_size=384", "target.num_attention_heads=6", "target.intermediate_size=1024"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pruned", default="runs/bench/prune_smollm2/activation")
    parser.add_argument("--run-dir", default="runs/bench/distill_smollm2")
    parser.add_argument("--tokens", type=int, default=300_000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-sequences", type=int, default=64)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    base = ["data=python-docs", "eval.seq_len=256", "resume=true"]
    if not (Path(args.pruned) / "config.json").is_file():
        stages.prune(load_config(None, base + TARGET + ["model=smollm2-135m", f"out_dir={args.pruned}",
                                                        "prune.reconstruct=none"]))  # the start its table shows
    budget = [f"{s}.{k}={v}" for s in ("distill", "train") for k, v in (
        ("tokens", args.tokens), ("lr", args.lr), ("min_lr", args.lr / 10), ("batch_size", 8), ("seq_len", 256),
        ("warmup_steps", 5), ("eval_every", 0), ("save_every", 20), ("eval_sequences", 16))]
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

    print(f"{'student (67.6M params)':36} {'val ppl':>10} {'minutes':>8}   ({args.tokens:,} training tokens each)")
    for r in rows:
        print(f"{r['model']:36} {r['perplexity']:>10.2f} {r['seconds'] / 60:>8.1f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"tokens": args.tokens, "lr": args.lr, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
