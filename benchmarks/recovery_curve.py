"""Recovery curve: held-out perplexity of the pruned SmolLM2 against distillation tokens, up to 1M tokens.

    python benchmarks/recovery_curve.py            # about an hour alone on 2 CPU cores; resumes when rerun
    python benchmarks/recovery_curve.py --report-only   # the curve so far, while a run is in progress
    python benchmarks/recovery_curve.py --recipe main --run-dir runs/bench/recovery-main \
        --out benchmarks/results/recovery_curve_main.json     # the main command's recipe instead

Prunes the README's shape (hidden 384, 6 heads, ffn 1024, all 30 layers; 67.6M of 134.5M parameters) with the
default recipe, then distils it from the teacher for --tokens tokens, validating every --eval-every-tokens on the
same held-out python-docs rows. The recipe: the benchmarks' KD recipe (8 x 256 per step, AdamW, LR 1e-3 cosine
to 1e-4), or with --recipe main configs/smollm2-135m.yaml's distill section (2 x 256 per step, half the data's
cross-entropy mixed in, the autocast default) with only the budget, validation and saving changed. Writes
benchmarks/results/recovery_curve.json and .png (committed: this one is run once, not by run_all).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from common import KD_RECIPE, RESULTS, ROOT, TARGET, Table, kd_keys, write_result

from compactlm import data, inputs, stages
from compactlm.config import load_config
from compactlm.metrics import perplexity
from compactlm.models.loading import load_model



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/bench/recovery")
    parser.add_argument("--tokens", type=int, default=1_048_576)
    parser.add_argument("--eval-every-tokens", type=int, default=65_536, help="training tokens between validations")
    parser.add_argument("--recipe", choices=("bench", "main"), default="bench",
                        help="bench: common.KD_RECIPE; main: configs/smollm2-135m.yaml's distill section")
    parser.add_argument("--eval-sequences", type=int, default=32)
    parser.add_argument("--out", default=str(RESULTS / "recovery_curve.json"))  # its plot: the same name, .png
    parser.add_argument("--report-only", action="store_true",
                        help="write the JSON and plot from the validations logged so far (a run in progress)")
    args = parser.parse_args()

    run = Path(args.run_dir)
    base = ["data=python-docs", "seed=0", "calib.sequences=64"]
    pruned = run / "prune"
    if not (pruned / "config.json").is_file():
        stages.prune(load_config(None, base + TARGET + ["model=smollm2-135m", f"out_dir={pruned}"]))
    main_config = ROOT / "configs" / "smollm2-135m.yaml" if args.recipe == "main" else None
    recipe = load_config(main_config, []).distill if main_config else None
    per_step = recipe.batch_size * recipe.seq_len if recipe else KD_RECIPE["batch_size"] * KD_RECIPE["seq_len"]
    every = max(args.eval_every_tokens // per_step, 1)
    budget = dict(tokens=args.tokens, eval_every=every, save_every=every, eval_sequences=args.eval_sequences)
    distill = [f"distill.{k}={v}" for k, v in budget.items()] if main_config else kd_keys(**budget)
    cfg = load_config(main_config, base + distill + ["teacher=smollm2-135m", f"student={pruned}",
                                                     f"out_dir={run / 'distill'}", "resume=true", "export.type=null"])
    if not args.report_only:
        stages.distill(cfg)

    teacher, tokenizer = inputs.load(load_config(None, base + ["model=smollm2-135m"]))
    val = inputs.load_splits(cfg, tokenizer, cfg.distill.seq_len, calib=False,
                             val_rows=args.eval_sequences).val[: args.eval_sequences]
    batches = list(data.batches(val, 8))
    tokens_per_step = cfg.distill.batch_size * cfg.distill.seq_len
    points = [{"tokens": 0, "perplexity": perplexity(load_model(str(pruned)), batches)["perplexity"]}]
    for line in (run / "distill" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "val_ppl" in row:
            points.append({"tokens": row["step"] * tokens_per_step, "perplexity": row["val_ppl"]})
    used = load_config(str(pruned / "compactlm.yaml"), [])  # the recipe the student was pruned with
    result = {"teacher_perplexity": perplexity(teacher, batches)["perplexity"], "points": points,
              "tokens_planned": args.tokens, "shape": TARGET, "distill": dataclasses.asdict(cfg.distill),
              "autocast": cfg.autocast,
              "recipe": {"importance": used.importance.method, "aggregation": used.importance.aggregation,
                         **{f"prune.{k}": v for k, v in dataclasses.asdict(used.prune).items()}}}
    out = write_result(Path(args.out).stem, figures=result, tables={"curve": curve_table(result)}, out=args.out,
                       inputs={"model": "smollm2-135m", "data": "python-docs"})
    plot(result, out.with_suffix(".png"))
    print(f"teacher: {result['teacher_perplexity']:.2f}")


def curve_table(result: dict) -> Table:
    """Held-out perplexity at 0 and 65K tokens, then every 131K (the plot has every point)."""
    shown = [p for p in result["points"] if p["tokens"] in (0, 65536) or p["tokens"] % 131072 == 0]
    table = Table(["tokens", *(f"{round(p['tokens'] / 1000):,}K" if p["tokens"] else "0" for p in shown)])
    table.add("held-out perplexity", *(f"{p['perplexity']:.0f}" if p["perplexity"] >= 200 else f"{p['perplexity']:.1f}"
                                       for p in shown))
    return table

def plot(result: dict, path: Path) -> None:
    """Perplexity against tokens (log y), the teacher as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["tokens"] for p in result["points"]]
    ax.plot(xs, [p["perplexity"] for p in result["points"]], marker="o", label="pruned student, distilled")
    ax.axhline(result["teacher_perplexity"], linestyle="--", color="gray", label="teacher (SmolLM2-135M)")
    ax.set_yscale("log")
    ax.set_xlabel("distillation tokens")
    ax.set_ylabel("held-out perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
