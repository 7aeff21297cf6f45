"""Distil the same pruned SmolLM2 with compactlm and with NVIDIA Model Optimizer (`modelopt.torch.distill`) and
print held-out perplexity before/after, median seconds per step and peak RSS side by side.

    bash scripts/setup_modelopt.sh && python benchmarks/bench_modelopt_kd.py [--steps 40]

Same for every run: the student (the README's shape, pruned by compactlm into RUN_DIR/pruned), the teacher
(the built-in SmolLM2-135M saved as a plain checkpoint in RUN_DIR/teacher), the training batches (compactlm's
own rows in its own order, exported to RUN_DIR/rows.pt), steps, batch 8 x 256, AdamW (lr 1e-3, betas 0.9/0.95,
weight decay 0.01 on matrices), warm-up 5 steps then cosine to 1e-4, grad clip 1.0, float32, temperature 1.
Each training runs in a fresh process under /usr/bin/time -v (peak RSS); compactlm in this venv, Model
Optimizer in its own (benchmarks/modelopt_kd_worker.py), twice: with the per-token mean of the KL (compactlm's
loss, and that of modelopt's HF KDTrainer) and with LogitsDistillationLoss's default reduction="mean" (the
same KL divided by the vocabulary size). Perplexity is compactlm's evaluator on the same validation rows.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import KD_RECIPE, ROOT, TARGET, Table, write_result

from compactlm import stages
from compactlm.config import load_config
from compactlm.data import batches
from compactlm.distill.loop import batch_rows, total_steps
from compactlm.inputs import load_splits
from compactlm.metrics import perplexity
from compactlm.models.loading import load_model, load_tokenizer, write_checkpoint

WORKER = ROOT / "benchmarks" / "modelopt_kd_worker.py"
TRAIN = KD_RECIPE | {"weight_decay": 0.01, "grad_clip": 1.0, "temperature": 1.0, "eval_every": 0, "save_every": 0, "eval_sequences": 8}  # 0: at the end only
MODELOPT = {"token": "Model Optimizer, KL mean over tokens", "mean": "Model Optimizer, default reduction='mean'"}


def distill_overrides(run_dir: Path, steps: int, out_dir: Path) -> list[str]:
    """compactlm's distill config for this benchmark; the exported rows are read with the same one."""
    return [f"teacher={run_dir / 'teacher'}", f"student={run_dir / 'pruned'}", "data=python-docs", f"out_dir={out_dir}",
            f"distill.steps={steps}", *(f"distill.{k}={v}" for k, v in TRAIN.items())]


def prepare(run_dir: Path, steps: int, val_rows: int) -> torch.Tensor:
    """Pruned student and teacher checkpoints (reused when present) and RUN_DIR/rows.pt; the (N, S) val rows."""
    if not (run_dir / "pruned" / "config.json").is_file():
        stages.prune(load_config(None, ["model=smollm2-135m", "data=python-docs", "calib.sequences=64", *TARGET,
                                        f"out_dir={run_dir / 'pruned'}"]))
    if not (run_dir / "teacher" / "config.json").is_file():
        write_checkpoint(load_model("smollm2-135m"), load_tokenizer("smollm2-135m"), run_dir / "teacher")
    cfg = load_config(None, distill_overrides(run_dir, steps, run_dir / "compactlm"))
    tc = cfg.distill
    splits = load_splits(cfg, load_tokenizer(cfg.student), tc.seq_len, calib=False,  # as stages._fit reads them
                         train_tokens=total_steps(tc) * tc.batch_size * tc.seq_len, val_rows=tc.eval_sequences)
    n = len(splits.train)
    train = torch.stack([splits.train[batch_rows(n, s * tc.batch_size, tc.batch_size, cfg.seed)] for s in range(steps)])
    val = torch.as_tensor(splits.val[:val_rows])  # (N, S)
    torch.save({"train": train, "val": val}, run_dir / "rows.pt")  # train: (steps, B, S), the loop's order
    return val


def timed(cmd: list[str], log: Path) -> dict:
    """Run `cmd` in a fresh process under /usr/bin/time -v: wall seconds, CPU seconds, peak RSS in GiB."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", "-o", str(log), *cmd])
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return {"wall_s": time.perf_counter() - start, **usage(log)}


def usage(log: Path) -> dict:
    """Peak RSS (GiB) and user + system CPU seconds from /usr/bin/time -v's report; CPU time, unlike wall
    time, barely changes when other jobs share the cores."""
    text = log.read_text()

    def field(name: str) -> float:
        return float(re.search(rf"{name}: ([\d.]+)", text).group(1))

    return {"peak_rss_gb": field(r"Maximum resident set size \(kbytes\)") / 2**20,
            "cpu_s": field(r"User time \(seconds\)") + field(r"System time \(seconds\)")}


def run_compactlm(run_dir: Path, steps: int) -> dict:
    out = run_dir / "compactlm"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resume
    measured = timed([sys.executable, "-m", "compactlm", "distill", *distill_overrides(run_dir, steps, out)],
                     run_dir / "compactlm.time.txt")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:  # compactlm times each step (batch, forward, backward, optimizer) as tokens/s
        r["seconds"] = TRAIN["batch_size"] * TRAIN["seq_len"] / r["tokens_per_s"]
    return summary("compactlm, forward KL (chunked)", out, measured, rows)


def run_modelopt(run_dir: Path, python: str, reduction: str) -> dict:
    out = run_dir / f"modelopt-{reduction}"
    shutil.rmtree(out, ignore_errors=True)
    flags = {"--lr": TRAIN["lr"], "--min-lr": TRAIN["min_lr"], "--warmup-steps": TRAIN["warmup_steps"],
             "--weight-decay": TRAIN["weight_decay"], "--grad-clip": TRAIN["grad_clip"],
             "--temperature": TRAIN["temperature"], "--reduction": reduction}
    cmd = [python, str(WORKER), "--teacher", str(run_dir / "teacher"), "--student", str(run_dir / "pruned"),
           "--rows", str(run_dir / "rows.pt"), "--out", str(out), *(str(x) for kv in flags.items() for x in kv)]
    measured = timed(cmd, run_dir / f"modelopt-{reduction}.time.txt")
    return summary(MODELOPT[reduction], out, measured, json.loads((out / "result.json").read_text())["rows"])


def summary(tool: str, out: Path, measured: dict, rows: list[dict]) -> dict:
    """One training's numbers: `rows` are its per-step metrics ({"loss", "seconds", "tokens", ...})."""
    return {"tool": tool, "model": out / "final", **measured, "step_seconds": [r["seconds"] for r in rows],
            "losses": [r["loss"] for r in rows], "tokens": rows[-1]["tokens"]}


def table(results: list[dict], before: float) -> Table:
    out = Table(["tool", "steps", "tokens", "held-out perplexity before", "after", "median seconds per step",
                 "process CPU s", "peak RSS", "KD loss, step 1 -> last"])
    for r in results:
        out.add(r["tool"], len(r["losses"]), r["tokens"], f"{before:,.1f}", f"{r['perplexity']:,.1f}",
                f"{statistics.median(r['step_seconds']):.2f}", f"{r['cpu_s']:.0f}", f"{r['peak_rss_gb']:.2f} GB",
                f"{r['losses'][0]:.4g} -> {r['losses'][-1]:.4g}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench/modelopt_kd"))
    parser.add_argument("--modelopt-python", default=str(ROOT / ".venv-modelopt" / "bin" / "python"))
    parser.add_argument("--modelopt-loss", choices=("both", *MODELOPT), default="both",
                        help="reduction(s) of modelopt's LogitsDistillationLoss to run (see the module docstring)")
    parser.add_argument("--val-rows", type=int, default=64, help="held-out rows of 256 tokens for perplexity")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of every process (0: torch's default); 1 on cores shared with other jobs")
    parser.add_argument("--out", type=Path, help="write the results here instead of benchmarks/results/modelopt_kd.json")
    args = parser.parse_args()
    if not Path(args.modelopt_python).is_file():
        print(f"no Model Optimizer venv at {args.modelopt_python}: run bash scripts/setup_modelopt.sh first")
        sys.exit(2)

    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the training processes
        torch.set_num_threads(args.threads)
    start, load = time.perf_counter(), os.getloadavg()[1]  # other processes on the cores slow every number
    args.run_dir.mkdir(parents=True, exist_ok=True)
    val = list(batches(prepare(args.run_dir, args.steps, args.val_rows), 8))
    results = [run_compactlm(args.run_dir, args.steps)]
    for reduction in MODELOPT if args.modelopt_loss == "both" else [args.modelopt_loss]:
        results.append(run_modelopt(args.run_dir, args.modelopt_python, reduction))
    before = perplexity(load_model(str(args.run_dir / "pruned")), val)["perplexity"]
    for r in results:
        r["perplexity"] = perplexity(load_model(str(r["model"])), val)["perplexity"]
    wall, load = time.perf_counter() - start, max(load, os.getloadavg()[1])

    print(f"\nheld-out: {sum(len(b['input_ids']) for b in val)} rows of 256 tokens; process CPU s: the whole training "
          f"process (loading, steps, saving); benchmark wall time {wall / 60:.1f} min, "
          f"{torch.get_num_threads()} torch threads per process, 5-min load average up to {load:.1f} on {os.cpu_count()} cores")
    rows = [{k: str(v) if k == "model" else v for k, v in r.items()} for r in results]
    meta = {"steps": args.steps, "train": TRAIN, "perplexity_before": before, "wall_s": wall,
            "threads": torch.get_num_threads(), "load_avg_5min": load}
    write_result("modelopt_kd", figures=meta | {"results": rows}, tables={"kd": table(results, before)},
                 inputs={"model": "smollm2-135m", "data": "python-docs"}, out=args.out)

if __name__ == "__main__":
    main()
