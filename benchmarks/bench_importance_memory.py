"""Memory and time of each importance method on SmolLM2-135M, each in a fresh process (peak RSS).

    python benchmarks/bench_importance_memory.py

Activation and output-aware scores are forward-only hooks; first-order Taylor runs a backward pass through the
whole model per batch (the activations of a batch are kept for it, and the LM loss's logits with their
gradient), which is what it costs over the forward-only methods.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from common import Table, write_result

METHODS = ("load only", "activation", "output_aware", "taylor")


def child(method: str, sequences: int, batch_size: int) -> None:
    """Load the model and calibration batches, score with `method`, print {"seconds", "peak_gb"} as JSON."""
    from compactlm import inputs
    from compactlm.config import load_config
    from compactlm.importance import score

    cfg = load_config(None, ["model=smollm2-135m", "data=python-docs", f"calib.sequences={sequences}",
                             "calib.seq_len=256", f"calib.batch_size={batch_size}"])
    model, tokenizer = inputs.load(cfg)
    batches = inputs.calibration_batches(cfg, tokenizer, model)
    start = time.perf_counter()
    if method != "load only":
        score(model, batches, method=method, layer_metrics=())
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(json.dumps({"seconds": seconds, "peak_gb": peak_gb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="write the results here instead of benchmarks/results/importance_memory.json")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.sequences, args.batch_size)
        return
    rows = []
    for method in METHODS:
        out = subprocess.run([sys.executable, __file__, "--child", method, "--sequences", str(args.sequences),
                              "--batch-size", str(args.batch_size)], capture_output=True, text=True, check=True)
        rows.append({"method": method, **json.loads(out.stdout.strip().splitlines()[-1])})
    base = rows[0]["peak_gb"]
    print(f"SmolLM2-135M, {args.sequences} x 256 calibration tokens in batches of {args.batch_size}, float32")
    table = Table(["method", "scoring seconds", "peak RSS", "above loading the model"])
    for r in rows:
        table.add(r["method"], f"{r['seconds']:.1f}", f"{r['peak_gb']:.2f} GB", f"{r['peak_gb'] - base:+.2f} GB")
    write_result("importance_memory", figures={"sequences": args.sequences, "batch_size": args.batch_size, "rows": rows},
                 tables={"memory": table}, inputs={"model": "smollm2-135m", "data": "python-docs"}, out=args.out)

if __name__ == "__main__":
    main()
