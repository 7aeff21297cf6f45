"""Per-layer widths against uniform ones at the same parameters: SmolLM2-135M-Instruct (a Q4_1 GGUF file,
dequantized) cut to about 50% and 25% of its parameters, zero-shot (after the refit) and after distillation.

Every shape keeps the same hidden channels and all 30 layers. Uniform: every layer keeps the target's heads and
MLP width (50%: the README's shape, hidden 384, 6 heads in 3 KV groups, MLP 1024; 25%: hidden 256, 4 heads in 2
KV groups, MLP 640). Per-layer (`pruning.per_layer`): the same parameters, spent on the neurons and whole KV groups that write
the most into the residual stream across layers, as written ("write") or relative to the stream's size where
each layer reads it ("relative"). Each student is refitted as `prune` does (prune.reconstruct=all on the main
config's calibration rows) and measured zero-shot; uniform and the per-layer rule with the better zero-shot
perplexity are then distilled as the main command does (its distill section: 2 rows a step, + half the data's
cross-entropy, LR 1e-3 cosine to 1e-4) for --tokens tokens. Held-out perplexity, KL and top-1 agreement on the main command's 32 validation rows. Per-layer models
are trained in memory here (`prune.per_layer` saves them: models/layer_shapes.py).

The budget search (`prune.per_layer_strength`): the relative rule at strengths 0, 0.25, 0.5 and 0.75 too (each
layer's counts moved that far from the uniform target's toward the global ranking's; 1 is "relative"), every one
refitted and measured like the rest. The search's own criterion, the language-model loss of the plainly sliced
model on the calibration rows, is recorded for every shape; the strength it picks ("searched") is distilled
too when it is not 1.

    python benchmarks/per_layer.py [--tokens 32768] [--scores runs/main/prune/scores.safetensors] [--also relative@0.0]

Resumes: a (size, shape) whose result is in --run-dir is not run again. Writes benchmarks/results/per_layer.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from common import ROOT, Table, held_out, write_result

from compactlm import data, inputs
from compactlm.config import load_config
from compactlm.distill.distributed import setup
from compactlm.distill.loop import Session, fit
from compactlm.importance.scores import Scores
from compactlm.metrics import perplexity
from compactlm.models.family import family_of
from compactlm.models.params import param_count
from compactlm.pruning import make_plan, prune_model
from compactlm.pruning.per_layer import per_layer_plan, plan_params, stream_norms
from compactlm.pruning.reconstruct import reconstruct

MAIN = ROOT / "configs" / "smollm2-135m.yaml"
STRENGTHS = (0.0, 0.25, 0.5, 0.75)  # the relative rule's budgets between uniform's (0) and the ranking's (1)
SHAPES = ("uniform", "write", "relative", *(f"relative@{s}" for s in STRENGTHS))  # uniform first
SIZES = {"50%": dict(hidden=384, heads=6, kv_heads=3, ffn=1024), "25%": dict(hidden=256, heads=4, kv_heads=2, ffn=640)}


def build(size: str, shape: str, cfg, teacher, tokenizer, scores: Scores, streams: torch.Tensor):
    """The student of `size` and `shape` (uniform, or per-layer by the "write" or "relative" rule, "relative@s"
    at strength s), refitted."""
    family = family_of(teacher)
    source = family.dims(teacher.config)
    target = dataclasses.replace(source, **SIZES[size])
    layers = torch.arange(source.layers)
    rule, _, strength = shape.partition("@")
    if shape == "uniform":
        plan = make_plan(scores, source, target, drop_layers=[])
    else:
        plan = per_layer_plan(teacher, scores, family, source, target, layers, streams if rule == "relative" else None,
                              float(strength or 1.0))
    student = prune_model(teacher, plan)
    calib = inputs.calibration_batches(cfg, tokenizer, teacher)
    search_loss = perplexity(student, calib)["loss"]  # the budget search's criterion: before the refit
    reconstruct(teacher, student, plan, calib, progress=True)
    info = {"size": size, "shape": shape, "search_loss": search_loss, "params": plan_params(teacher, family, source, plan),
            "uniform_params": param_count(teacher, family, target),
            "ffn": [len(plan.ffn[i]) for i in layers.tolist()], "kv_groups": [len(plan.kv_heads[i]) for i in layers.tolist()]}
    return student, plan, info


def distil(student, plan, cfg, teacher, tokenizer, out: Path) -> float:
    """The main command's distillation of `student` in memory (nothing saved); its seconds."""
    tc = cfg.distill
    splits = inputs.load_splits(cfg, tokenizer, tc.seq_len, calib=False, train_tokens=tc.tokens,
                                val_rows=tc.eval_sequences)
    out.mkdir(parents=True, exist_ok=True)  # the loop's metrics.jsonl
    start = time.perf_counter()
    fit(student.train(), splits.train, splits.val[: tc.eval_sequences], tc,
        Session(out, setup("cpu"), tokenizer, cfg.seed, save=False, progress=True), teacher=teacher,
        hidden_keep=plan.hidden)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32_768)
    parser.add_argument("--scores", type=Path, default=Path("runs/main/prune/scores.safetensors"),
                        help="the main command's importance scores (`python benchmarks/main_command.py --keep runs/main`)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench/per_layer"))
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--also", nargs="+", default=[], choices=SHAPES, help="distil these shapes too")
    parser.add_argument("--out", help="write the results here instead of benchmarks/results/per_layer.json")
    parser.add_argument("--only-done", action="store_true",
                        help="write the results of the finished runs in --run-dir, computing nothing")
    args = parser.parse_args()
    if args.only_done:
        return write(args, [json.loads(p.read_text()) for size in args.sizes for shape in SHAPES
                            if (p := args.run_dir / f"{args.tokens}" / f"{size.rstrip('%')}-{shape}.json").is_file()])
    torch.manual_seed(0)
    teacher, tokenizer = inputs.load(load_config(MAIN, []))
    scores = Scores.load(args.scores)
    scores.check(family_of(teacher).dims(teacher.config), str(args.scores))
    cfg = load_config(MAIN, [f"distill.tokens={args.tokens}", "distill.eval_every=0", "distill.save_every=0"])
    val = inputs.load_splits(cfg, tokenizer, cfg.eval.seq_len, calib=False,
                             val_rows=cfg.eval.sequences).val[: cfg.eval.sequences]
    batches = list(data.batches(val, cfg.eval.batch_size))
    streams = stream_norms(teacher, family_of(teacher), inputs.calibration_batches(cfg, tokenizer, teacher))
    run_dir = args.run_dir / f"{args.tokens}"
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        built, results = {}, {}
        for shape in SHAPES:  # zero-shot, every shape
            path = run_dir / f"{size.rstrip('%')}-{shape}.json"
            if path.is_file():
                results[shape] = json.loads(path.read_text())
                continue
            student, plan, info = build(size, shape, cfg, teacher, tokenizer, scores, streams)
            built[shape] = student, plan
            results[shape] = info | {"zero_shot": held_out(student, teacher, batches)}
            path.write_text(json.dumps(results[shape], indent=1) + "\n")
        best = min(("write", "relative"), key=lambda shape: results[shape]["zero_shot"]["perplexity"])
        searched = min(("relative", *SHAPES[3:]), key=lambda shape: results[shape]["search_loss"])
        results[searched]["searched"] = True
        # distilled: uniform, the better per-layer rule, and the strength the search picks
        for shape in dict.fromkeys(("uniform", best, searched, *args.also)):
            path = run_dir / f"{size.rstrip('%')}-{shape}.json"
            if "distilled" in results[shape]:
                continue
            student, plan = built.get(shape) or build(size, shape, cfg, teacher, tokenizer, scores, streams)[:2]
            seconds = distil(student, plan, cfg, teacher, tokenizer, run_dir / f"{size.rstrip('%')}-{shape}")
            results[shape] |= {"tokens": args.tokens, "kd_seconds": seconds,
                               "distilled": held_out(student.eval(), teacher, batches)}
            path.write_text(json.dumps(results[shape], indent=1) + "\n")
        for shape in SHAPES:
            r = results[shape]
            rows.append(r)
            after = f"{r['distilled']['perplexity']:7.2f}" if "distilled" in r else "      -"
            print(f"{size} {shape:<14} {r['params'] / 1e6:.1f}M  zero-shot {r['zero_shot']['perplexity']:9.1f}  "
                  f"distilled {after}", flush=True)
    write(args, rows)


def write(args, rows: list[dict]) -> None:
    """The results file: one row per (size, shape) measured."""
    table = Table(["size", "shape", "parameters", "search loss (calibration, not refitted)",
                   "zero-shot perplexity (refitted)", f"after {args.tokens:,} KD tokens", "KL to teacher",
                   "top-1 agreement", "MLP widths (min-max)", "KV groups (min-max)"])
    for r in rows:
        d = r.get("distilled")
        shape = r["shape"] + (" (searched)" if r.get("searched") else "")
        table.add(r["size"], shape, f"{r['params'] / 1e6:.1f}M", f"{r['search_loss']:.3f}" if "search_loss" in r else "",
                  f"{r['zero_shot']['perplexity']:,.1f}",
                  f"{d['perplexity']:.1f}" if d else "not distilled", f"{d['kl']:.3f}" if d else "",
                  f"{d['top1_agreement']:.1%}" if d else "", f"{min(r['ffn'])}-{max(r['ffn'])}",
                  f"{min(r['kv_groups'])}-{max(r['kv_groups'])}")
    write_result("per_layer", figures={"tokens": args.tokens, "rows": rows}, tables={"per_layer": table}, out=args.out,
                 inputs={"config": str(MAIN.relative_to(ROOT)), "scores": str(args.scores), "teacher": "smollm2-135m",
                         "data": "python-docs"})


if __name__ == "__main__":
    main()
