"""Prune the built-in SmolLM2-135M to half its parameters with activation, magnitude and random importance;
print held-out perplexity of each beside the teacher's.

    python benchmarks/prune_smollm2.py

Same target for every method: hidden 384, 6 heads (2 per KV group), ffn 1024, all 30 layers; the weights are
only sliced (`prune.reconstruct=none`), so the table compares the importance scores alone
(benchmarks/prune_quality.py measures the refit).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import TARGET, Table, write_result

from compactlm import data, inputs, stages
from compactlm.config import load_config
from compactlm.metrics import perplexity
from compactlm.models.loading import load_model
from compactlm.models.params import num_params



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/bench/prune_smollm2")
    parser.add_argument("--eval-sequences", type=int, default=64)
    parser.add_argument("--out", help="write the results here instead of benchmarks/results/prune_smollm2.json")
    args = parser.parse_args()

    base = ["model=smollm2-135m", "data=python-docs", "eval.seq_len=256", "prune.reconstruct=none"]  # plain slicing
    cfg = load_config(None, base)
    teacher, tokenizer = inputs.load(cfg)
    val = inputs.load_splits(cfg, tokenizer, cfg.eval.seq_len).val[: args.eval_sequences]
    batches = list(data.batches(val, cfg.eval.batch_size))
    rows = [{"model": "teacher (SmolLM2-135M)", "params": num_params(teacher), "seconds": 0.0,
             **perplexity(teacher, batches)}]
    for method in ("activation", "magnitude", "random"):
        out_dir = Path(args.run_dir) / method
        start = time.perf_counter()
        stages.prune(load_config(None, base + TARGET + [f"importance.method={method}", f"out_dir={out_dir}"]))
        seconds = time.perf_counter() - start
        pruned = load_model(str(out_dir))
        rows.append({"model": f"pruned, {method} importance", "params": num_params(pruned), "seconds": seconds,
                     **perplexity(pruned, batches)})

    table = Table(["model", "params", "held-out perplexity"])
    for r in rows:
        table.add(r["model"], f"{r['params'] / 1e6:.1f}M", f"{r['perplexity']:,.2f}")
    print(f"(validation: {rows[0]['tokens']} tokens of python-docs held out)")
    write_result("prune_smollm2", figures={"rows": rows}, tables={"importance": table},
                 inputs={"model": "smollm2-135m", "data": "python-docs"}, out=args.out)

if __name__ == "__main__":
    main()
