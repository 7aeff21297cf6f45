"""Time the README's main command as a new user meets it, and print where the time goes.

Runs `compactlm run --config configs/smollm2-135m.yaml` in a fresh process with an empty compactlm cache (so
the first load of the built-in model, its GGUF conversion, is included) into a temporary run directory, then
prints the wall time, each stage's seconds, the distillation's tokens/s (median over steps) and the held-out
results from the run's own files. Run it alone on the machine: other processes on the cores slow torch.

    python benchmarks/main_command.py [--config configs/smollm2-135m.yaml] [--keep runs/main]
    python benchmarks/main_command.py --config configs/gemma3-270m.yaml --result-name gemma3_270m

Writes benchmarks/results/main_command.json (or --out): the README's time and headline table are rendered from it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, Table, write_result

from compactlm.config import load_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "smollm2-135m.yaml"))
    p.add_argument("--keep-cache", action="store_true", help="use the usual cache (skips the first-load cost)")
    p.add_argument("--result-name", default="main_command", help="benchmarks/results/NAME.json (another config's run)")
    p.add_argument("--out", type=Path, help="write the results here instead of benchmarks/results/NAME.json")
    p.add_argument("--keep", type=Path, help="keep the run directory here (benchmarks/deploy.py reads its student)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="compactlm-main-") as tmp:
        env = dict(os.environ)
        if not args.keep_cache:
            env["COMPACTLM_CACHE"] = str(Path(tmp) / "cache")
        run_dir = Path(tmp) / "run"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "compactlm", "run", "--config", args.config,
                               f"out_dir={run_dir}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"compactlm run failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1]}")
        stages = {s.parent.name: json.loads(s.read_text())["seconds"] for s in run_dir.glob("*/stage.json")}
        rows = [json.loads(line) for line in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]
        results = json.loads((run_dir / "evaluate" / "eval.json").read_text())
        exported = run_dir / "export" / "stage.json"
        exported = json.loads(exported.read_text()) if exported.is_file() else None
        if args.keep:
            shutil.rmtree(args.keep, ignore_errors=True)
            shutil.copytree(run_dir, args.keep)
    tok_s = statistics.median(r["tokens_per_s"] for r in rows)
    rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
    print(f"main command: {wall / 60:.1f} min wall ({wall:.0f} s), peak RSS {rss_gb:.1f} GB, "
          f"fresh cache: {not args.keep_cache}")
    for name, seconds in sorted(stages.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<10} {seconds:7.1f} s")
    print(f"  distillation: {len(rows)} steps, {rows[-1]['tokens']:,} tokens, median {tok_s:.0f} tokens/s")
    for name in ("teacher", "pruned", "distilled"):
        m = results[name]
        kl = f", KL {m['kl']:.3f}, top-1 {m['top1_agreement']:.1%}" if "kl" in m else ""
        print(f"  {name:<10} {m['params'] / 1e6:.1f}M params, held-out perplexity {m['perplexity']:.1f}{kl}")
    if exported:
        print(f"  GGUF export: {exported['type']}, {exported['bytes'] / 2**20:.1f} MiB")
    used = load_config(args.config)
    table = Table(["stage", "params", "held-out perplexity", "KL to teacher", "top-1 agreement", "tokens/s (batch 1)"])
    for name in ("teacher", "pruned", "distilled"):
        m = results[name]
        table.add(name, f"{m['params'] / 1e6:.1f}M", f"{m['perplexity']:.1f}", f"{m['kl']:.2f}" if "kl" in m else "–",
                  f"{m['top1_agreement']:.1%}" if "kl" in m else "–",
                  f"{m['tokens_per_s']:.1f}" if m.get("tokens_per_s") else "–")
    figures = {"wall_s": wall, "peak_rss_gb": rss_gb, "stages_s": stages, "distill_tokens_per_s": tok_s,
               "fresh_cache": not args.keep_cache, "results": results, "export": exported}
    write_result(args.result_name, figures=figures, tables={"stages": table}, out=args.out,
                 values={"wall_min": f"{wall / 60:.1f}", "peak_rss_gb": f"{rss_gb:.1f}",
                         "distilled_perplexity": f"{results['distilled']['perplexity']:.1f}"},
                 inputs={"config": str(Path(args.config).relative_to(ROOT)) if Path(args.config).is_absolute()
                         and Path(args.config).is_relative_to(ROOT) else args.config,
                         "model": used.model, "data": used.data})


if __name__ == "__main__":
    main()
