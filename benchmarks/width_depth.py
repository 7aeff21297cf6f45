"""P1 Tables 1 and 10 in miniature: width, depth and width+depth pruning of SmolLM2-135M to the same parameter
count (~67M of 134.5M), held-out perplexity before and after the same distillation budget; and whether a better
start (the default recipe against P1's plain activation score) still matters after distillation.

    python benchmarks/width_depth.py      # ~40 min alone on 2 CPU cores

Every student is distilled from the teacher for --steps steps of 8 x 256 tokens (AdamW, LR 1e-3 cosine to 1e-4,
5 warm-up steps), the same data in the same order. One scoring pass (activation scores plus every depth metric
the variants use) is shared by all of them; `prune_s` is each variant's pruning from those scores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import TARGET, Table, kd_keys, write_result

from compactlm import data, inputs, stages
from compactlm.config import load_config
from compactlm.metrics import perplexity
from compactlm.models.family import family_of
from compactlm.models.loading import load_model
from compactlm.models.params import num_params

LAYER_METRICS = ("lm_loss", "block_importance", "contiguous_19")  # what the depth variants below drop by
WIDTH = TARGET
PAPER = ["importance.method=activation", "prune.reconstruct=none"]  # P1's activation score, plain slicing
VARIANTS = {
    "width, P1 recipe (activation, no reconstruction)": WIDTH + PAPER,
    "width, defaults": WIDTH,
    "depth (11 of 30 layers), lm_loss": ["target.num_hidden_layers=11", "target.layer_metric=lm_loss"],
    "depth (11 of 30 layers), block_importance": ["target.num_hidden_layers=11",
                                                  "target.layer_metric=block_importance"],
    "depth (11 of 30 layers), contiguous": ["target.num_hidden_layers=11", "target.layer_metric=contiguous"],
    "width + depth (24 layers)": ["target.num_hidden_layers=24", "target.hidden_size=384",
                                  "target.num_attention_heads=6", "target.intermediate_size=1344",
                                  "target.layer_metric=lm_loss"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/bench/width_depth")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-sequences", type=int, default=64)
    parser.add_argument("--out", help="write the results here instead of benchmarks/results/width_depth.json")
    args = parser.parse_args()

    base = ["data=python-docs", "seed=0", "calib.sequences=64", "calib.layer_sequences=16"]
    cfg = load_config(None, base + ["model=smollm2-135m"])
    teacher, tokenizer = inputs.load(cfg)
    val = inputs.load_splits(cfg, tokenizer, 256).val[: args.eval_sequences]
    batches = list(data.batches(val, 8))
    teacher_ppl = perplexity(teacher, batches)["perplexity"]
    budget = kd_keys(steps=args.steps, eval_every=0, save_every=args.steps, eval_sequences=16)
    # One calibration pass serves every variant: the activation scores and each depth metric they use.
    scored = Path(args.run_dir) / "score"
    start = time.perf_counter()
    if not (scored / stages.SCORES_FILE).is_file():
        stages.score(load_config(None, base + ["model=smollm2-135m", f"out_dir={scored}",
                                               f"importance.layer_metrics=[{','.join(LAYER_METRICS)}]"]))
    score_s = time.perf_counter() - start
    shared = [f"importance.scores={scored / stages.SCORES_FILE}"]
    rows = []
    for i, (name, overrides) in enumerate(VARIANTS.items()):
        run = Path(args.run_dir) / str(i)
        start = time.perf_counter()
        if not (run / "prune" / "config.json").is_file():
            stages.prune(load_config(None, base + overrides + shared + ["model=smollm2-135m",
                                                                        f"out_dir={run / 'prune'}"]))
        prune_s = time.perf_counter() - start
        pruned = load_model(str(run / "prune"))
        before = perplexity(pruned, batches)["perplexity"]
        start = time.perf_counter()
        stages.distill(load_config(None, base + budget + ["teacher=smollm2-135m", f"student={run / 'prune'}",
                                                          f"out_dir={run / 'distill'}", "resume=true"]))
        after = perplexity(load_model(str(run / "distill" / "final")), batches)["perplexity"]
        d = family_of(pruned).dims(pruned.config)
        rows.append({"variant": name, "layers": d.layers, "hidden": d.hidden, "heads": d.heads, "ffn": d.ffn,
                     "params": num_params(pruned), "zero_shot": before, "after_kd": after,
                     "prune_s": round(prune_s, 1), "distill_s": round(time.perf_counter() - start, 1)})
        print(rows[-1], flush=True)
    tokens = args.steps * 8 * 256
    print(f"\nteacher: {teacher_ppl:.2f}; distillation: {args.steps} steps, {tokens:,} tokens each; "
          f"shared scoring {score_s:.0f} s")
    table = Table(["pruning", "layers", "hidden", "heads", "ffn", "params", "zero-shot", f"after {tokens:,} tokens"])
    for r in rows:
        table.add(r["variant"], r["layers"], r["hidden"], r["heads"], r["ffn"], f"{r['params'] / 1e6:.1f}M",
                  f"{r['zero_shot']:,.0f}", f"{r['after_kd']:.2f}")
    write_result("width_depth", figures={"teacher": teacher_ppl, "tokens": tokens, "score_s": round(score_s, 1), "rows": rows},
                 tables={"shapes": table}, inputs={"model": "smollm2-135m", "data": "python-docs"}, out=args.out)

if __name__ == "__main__":
    main()
