"""The recipe table: distillation recipes side by side at the same tokens, from the same pruned student.

Each recipe is the main command's distillation (configs/smollm2-135m.yaml: SmolLM2-135M teaching its 67.6M
pruned student, LR 1e-3 cosine to 1e-4) with the forward KL alone (distill.ce_weight=0) and the keys it names
set; the batch is always named, since this table chose the config's (as the CE weight). Every recipe reads
the same training rows in the same order (the store's prefix) and is measured on the main command's own
held-out rows (eval.sequences x eval.seq_len): perplexity, KL to the teacher, top-1 agreement. Wall times
are printed but only comparable when the run had the machine to itself; the table's speed column is each run's
fastest step (tokens/s), which another process on the cores slows less often than the median.

Two recipes change the teacher rather than the loss: "-cached" ones distil from the teacher's cache (its
forward run once per row, `distill.teacher_top_k`), "-2ep" over half the rows twice; "-corrected" first
fine-tunes the teacher on the recipe's tokens (P2's teacher correction, `correction.enabled` in a run) and
distils from that one, its KL and top-1 still measured against the original teacher.

    python benchmarks/recipe.py [--tokens 65536] [--pruned runs/main/prune] [--recipes baseline batch4]

Resumes: a recipe whose result is in --run-dir is not run again. Writes benchmarks/results/recipe.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import ROOT, Table, held_out, write_result

from compactlm import data, inputs, stages
from compactlm.config import load_config
from compactlm.metrics import perplexity
from compactlm.models.loading import load_model

MAIN = ROOT / "configs" / "smollm2-135m.yaml"

# name -> (what changes, overrides of the main config's distill section)
RECIPES = {
    "baseline": ("8 x 256 tokens a step, LR 1e-3 cosine to 1e-4 (the main command's recipe before this table)",
                 ["distill.batch_size=8"]),
    "batch4": ("4 sequences per step (twice the steps)", ["distill.batch_size=4"]),
    "lr2e-3": ("peak LR 2e-3 (floor 2e-4)", ["distill.batch_size=8", "distill.lr=0.002", "distill.min_lr=0.0002"]),
    "batch4-lr2e-3": ("4 sequences per step, peak LR 2e-3 (floor 2e-4)",
                      ["distill.batch_size=4", "distill.lr=0.002", "distill.min_lr=0.0002"]),
    "batch4-lr5e-4": ("4 sequences per step, peak LR 5e-4 (floor 5e-5)",
                      ["distill.batch_size=4", "distill.lr=0.0005", "distill.min_lr=0.00005"]),
    "batch2": ("2 sequences per step (4x the steps)", ["distill.batch_size=2"]),
    "intermediate": ("+ the intermediate-state loss (last 2 blocks, learned map)",
                     ["distill.batch_size=8", "distill.intermediate=true"]),
    "batch4-intermediate": ("4 sequences per step + the intermediate-state loss (last 2 blocks, learned map)",
                            ["distill.batch_size=4", "distill.intermediate=true"]),
    "batch4-T2": ("4 sequences per step, temperature 2", ["distill.batch_size=4", "distill.temperature=2.0"]),
    "batch4-ce0.5": ("4 sequences per step + 0.5 x cross-entropy on the data",
                     ["distill.batch_size=4", "distill.ce_weight=0.5"]),
    "batch4-rkl": ("4 sequences per step, reverse KL: of q from p (MiniLLM)",
                   ["distill.batch_size=4", "distill.divergence=reverse_kl"]),
    "batch4-skl": ("4 sequences per step, skew KL: of p from 0.1 p + 0.9 q (DistiLLM)",
                   ["distill.batch_size=4", "distill.divergence=skew_kl", "distill.skew=0.1"]),
    "batch4-srkl": ("4 sequences per step, skew reverse KL: of q from 0.9 p + 0.1 q (DistiLLM)",
                    ["distill.batch_size=4", "distill.divergence=skew_reverse_kl", "distill.skew=0.1"]),
    "batch4-jsd": ("4 sequences per step, Jensen-Shannon, beta 0.5 (GKD)",
                   ["distill.batch_size=4", "distill.divergence=jsd", "distill.skew=0.5"]),
    "batch2-ce0.5": ("2 sequences per step + 0.5 x cross-entropy on the data (the main command's recipe now)",
                     ["distill.batch_size=2", "distill.ce_weight=0.5"]),
    "batch4-floor0": ("4 sequences per step, cosine to 0 (floor 0)", ["distill.batch_size=4", "distill.min_lr=0"]),
    # the main command's recipe (2 rows a step, half the data's CE) with one more thing changed
    "batch2-ce0.5-floor0": ("the main recipe, cosine to 0 (floor 0)",
                            ["distill.batch_size=2", "distill.ce_weight=0.5", "distill.min_lr=0"]),
    "batch1-ce0.5": ("the main recipe with 1 sequence per step (twice the steps)",
                     ["distill.batch_size=1", "distill.ce_weight=0.5"]),
    "batch1-seq512-ce0.5": ("the main recipe with 1 sequence of 512 tokens per step (the same tokens a step)",
                            ["distill.batch_size=1", "distill.seq_len=512", "distill.ce_weight=0.5"]),
    "batch2-ce0.5-lr2e-3": ("the main recipe at peak LR 2e-3 (floor 2e-4)",
                            ["distill.batch_size=2", "distill.ce_weight=0.5", "distill.lr=0.002", "distill.min_lr=0.0002"]),
    "batch2-ce1": ("2 sequences per step + 1.0 x cross-entropy on the data", ["distill.batch_size=2", "distill.ce_weight=1.0"]),
    "batch2-ce0.5-cached": ("the main recipe from the teacher's cache (64 sampled tokens a position, one epoch)",
                            ["distill.batch_size=2", "distill.ce_weight=0.5", "distill.teacher_top_k=64"]),
    "batch2-ce0.5-cached-2ep": ("the main recipe from the teacher's cache, two epochs over half the rows",
                                ["distill.batch_size=2", "distill.ce_weight=0.5", "distill.teacher_top_k=64",
                                 "dataset.max_tokens={half}"]),
    "batch2-ce0.5-corrected": ("the main recipe from a corrected teacher (fine-tuned on the same tokens first, P2)",
                               ["distill.batch_size=2", "distill.ce_weight=0.5", "teacher={corrected}"]),
}
# P2's teacher correction, in miniature: the teacher trained by cross-entropy on the distillation data (the
# recipe's own tokens, 4 rows a step, the train section's LR 1e-4 cosine to 1e-5) before it teaches
CORRECTION = ["model=smollm2-135m", "train.batch_size=4", "train.eval_every=0", "train.save_every=16"]


def run_recipe(name: str, overrides: list[str], pruned: Path, run_dir: Path, tokens: int) -> dict:
    """Distil `pruned` with the main config + `overrides` into run_dir/name (resumable); its held-out metrics."""
    done = run_dir / name / "recipe.json"
    if done.is_file():
        return json.loads(done.read_text())
    start = time.perf_counter()
    corrected = corrected_teacher(run_dir, tokens) if any("{corrected}" in o for o in overrides) else None
    overrides = [o.format(half=tokens // 2, corrected=corrected) for o in overrides]
    cfg = load_config(MAIN, [f"distill.tokens={tokens}", "distill.eval_every=0", "distill.save_every=8",
                             "teacher=smollm2-135m", f"student={pruned}", f"out_dir={run_dir / name}",
                             "resume=true", "distill.ce_weight=0", *overrides])
    stages.distill(cfg)
    seconds = time.perf_counter() - start  # with the teacher's correction, when the recipe has one
    main = load_config(MAIN, [])  # the main command's own validation rows, whatever the recipe's data keys
    teacher, tokenizer = inputs.load(main)
    val = inputs.load_splits(main, tokenizer, main.eval.seq_len, calib=False,
                             val_rows=main.eval.sequences).val[: main.eval.sequences]
    batches = list(data.batches(val, main.eval.batch_size))
    student = load_model(str(run_dir / name / "final"))
    result = {"recipe": name, "overrides": overrides, **held_out(student, teacher, batches), "tokens": tokens,
              "seconds": seconds}
    if corrected:  # KL and top-1 stay against the original teacher; the corrected one's own perplexity beside
        result["corrected_teacher_perplexity"] = perplexity(load_model(str(corrected)), batches)["perplexity"]
    done.write_text(json.dumps(result, indent=1) + "\n")
    return result


def corrected_teacher(run_dir: Path, tokens: int) -> Path:
    """The teacher fine-tuned on `tokens` of the distillation data (resumable, shared by every recipe that
    names it): its final model."""
    out = run_dir / "corrected-teacher"
    if not (out / "final" / "config.json").is_file():
        stages.train(load_config(MAIN, [*CORRECTION, f"train.tokens={tokens}", f"out_dir={out}", "resume=true"]))
    return out / "final"


def fastest(run: Path) -> float:
    """The highest tokens/s of any step of a recipe's run (its metrics.jsonl)."""
    return max(json.loads(line)["tokens_per_s"] for line in (run / "metrics.jsonl").read_text().splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--pruned", type=Path, default=Path("runs/main/prune"),
                        help="the pruned student (`python benchmarks/main_command.py --keep runs/main` leaves one)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench/recipe"))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--out", help="write the results here instead of benchmarks/results/recipe.json")
    args = parser.parse_args()
    if not (args.pruned / "config.json").is_file():
        stages.prune(load_config(MAIN, [f"out_dir={args.pruned}"]))
    run_dir = args.run_dir / f"{args.tokens}"
    rows = []
    for name in args.recipes:
        rows.append(run_recipe(name, RECIPES[name][1], args.pruned, run_dir, args.tokens))
        r = rows[-1]
        print(f"{name:<14} perplexity {r['perplexity']:7.2f}  KL {r['kl']:.3f}  top-1 {r['top1_agreement']:.1%}  "
              f"{r['seconds'] / 60:5.1f} min", flush=True)
    table = Table([f"recipe ({args.tokens:,} tokens from the same pruned student)", "what changes",
                   "held-out perplexity", "KL to teacher", "top-1 agreement", "fastest step, tokens/s"])
    for r in sorted(rows, key=lambda r: r["perplexity"]):
        r["fastest_tokens_per_s"] = fastest(run_dir / r["recipe"])
        table.add(r["recipe"], RECIPES[r["recipe"]][0], f"{r['perplexity']:.1f}", f"{r['kl']:.3f}",
                  f"{r['top1_agreement']:.1%}", f"{r['fastest_tokens_per_s']:.0f}")
    write_result(Path(args.out).stem if args.out else "recipe", figures={"tokens": args.tokens, "rows": rows},
                 tables={"recipes": table},
                 inputs={"config": str(MAIN.relative_to(ROOT)), "pruned": str(args.pruned), "teacher": "smollm2-135m",
                         "data": "python-docs"}, out=args.out)


if __name__ == "__main__":
    main()
