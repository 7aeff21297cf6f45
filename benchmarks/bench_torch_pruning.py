"""Compare compactlm's MLP pruning of the built-in SmolLM2-135M with Torch-Pruning 1.6 (activation, Taylor and
magnitude importance); print held-out perplexity, parameters and pruning time of each beside the teacher's.

    pip install "torch-pruning>=1.6,<1.7"   # or: pip install -e ".[bench]"
    python benchmarks/bench_torch_pruning.py

Every row cuts every layer's intermediate_size to the same width (ffn 1072 and 768) and changes nothing else;
all see the same calibration rows (calib.sequences x calib.seq_len of python-docs) and are evaluated by
compactlm.metrics.perplexity on the same held-out rows. compactlm's seconds include loading the model, scoring
and writing the checkpoint; Torch-Pruning's include loading a fresh copy, tracing, calibration passes and pruning.
Last, Torch-Pruning's full LLM recipe (hidden channels, heads and MLP at ratio 0.5, as in its
examples/LLMs/prune_llm.py) is set up in a subprocess under a time bound (--bound-s), and the outcome printed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
from common import Table, write_result
from tqdm import tqdm

try:
    import torch_pruning as tp
except ImportError:
    sys.exit('bench_torch_pruning: torch_pruning is not installed: pip install "torch-pruning>=1.6,<1.7"')

from compactlm import data, inputs, stages
from compactlm.config import load_config
from compactlm.metrics import perplexity
from compactlm.models.loading import load_model
from compactlm.models.params import num_params, params_of_config

FFNS = (1072, 768)
warnings.filterwarnings("ignore", message="Unwrapped parameters detected")  # the RMSNorm weights: not pruned here


# ---------------------------------------------------------------- compactlm

def compactlm_prune(base: list[str], overrides: list[str], out_dir: Path):
    """(pruned model, seconds) from compactlm's prune stage with `overrides`."""
    start = time.perf_counter()
    stages.prune(load_config(None, base + overrides + [f"out_dir={out_dir}"]))
    return load_model(str(out_dir)), time.perf_counter() - start


# ---------------------------------------------------------------- Torch-Pruning

def mlp_pruner(model, importance, ffn: int, example: torch.Tensor) -> tp.pruner.MetaPruner:
    """A local (per layer) pruner of the MLP neurons only: every Linear but gate_proj / up_proj is ignored, so the
    only groups are gate_proj's (with up_proj and down_proj's inputs), each cut to `ffn`. Ignoring them also keeps
    the pruner from tracing the hidden-channel group, which spans the whole model and is too slow to build here
    (see the full-recipe line)."""
    ignored = [m for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not name.endswith(("gate_proj", "up_proj"))]
    ratio = 1 - ffn / model.config.intermediate_size
    return tp.pruner.MetaPruner(model, example, importance, global_pruning=False, pruning_ratio=ratio,
                                ignored_layers=ignored, output_transform=lambda out: out.logits)


def activation_pass(model, importance: tp.importance.ActivationImportance, batches: list) -> None:
    """TP's forward hooks *overwrite* each Linear's `_importance` (sum over tokens of |input|) on every forward,
    so only the last batch would count: sum them over all calibration batches instead."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    total: dict[torch.nn.Module, torch.Tensor] = {}
    with torch.no_grad(), importance.compute_importance(model):
        for batch in batches:
            model(**batch, logits_to_keep=1)  # the LM head's input is not scored: skip the full logits
            for m in linears:
                total[m] = total.get(m, 0) + m._importance
    for m in linears:
        m._importance = total[m]


def gradient_pass(model, batches: list) -> None:
    """Accumulate LM-loss gradients over the calibration batches (for GroupTaylorImportance)."""
    model.zero_grad(set_to_none=True)
    for batch in batches:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()


def tp_prune(cfg, method: str, ffn: int, batches: list):
    """(pruned model, seconds): a fresh teacher cut to `ffn` by Torch-Pruning with `method` importance."""
    start = time.perf_counter()
    model, _ = inputs.load(cfg)
    importance = {"activation": tp.importance.ActivationImportance(target_types=[torch.nn.Linear]),
                  "taylor": tp.importance.GroupTaylorImportance(),
                  "magnitude": tp.importance.GroupMagnitudeImportance(p=2)}[method]
    pruner = mlp_pruner(model, importance, ffn, batches[0]["input_ids"][:1, :32])  # traced before calibrating
    if method == "activation":
        activation_pass(model, importance, batches)
    elif method == "taylor":
        gradient_pass(model, batches)
    pruner.step()
    model.zero_grad(set_to_none=True)
    model.config.intermediate_size = ffn
    widths = {(m.gate_proj.out_features, m.up_proj.out_features, m.down_proj.in_features)
              for m in (layer.mlp for layer in model.model.layers)}
    if widths != {(ffn, ffn, ffn)} or params_of_config(model.config) != num_params(model):
        raise RuntimeError(f"Torch-Pruning {method}: MLP widths {widths} do not match a plain config with ffn {ffn}")
    return model, time.perf_counter() - start


def full_recipe(overrides: list[str], example: torch.Tensor, conn) -> None:
    """TP's LLM recipe set-up on SmolLM2 (run in a subprocess): a pruner over hidden channels, heads and MLP at
    ratio 0.5 with head pruning and magnitude importance, then one step. Sends ("stage", what) as it goes, then
    ("finished" | "failed", seconds, detail) through `conn`."""
    tqdm.set_lock(threading.RLock())  # not tqdm's default multiprocessing lock: a killed child would leak it
    start = time.perf_counter()
    try:
        model, _ = inputs.load(load_config(None, overrides))
        conn.send(("stage", "building the MetaPruner (dependency graph and all groups)"))
        attn = [layer.self_attn for layer in model.model.layers]
        c = model.config
        num_heads = {m.q_proj: c.num_attention_heads for m in attn}
        num_heads |= {p: c.num_key_value_heads for m in attn for p in (m.k_proj, m.v_proj)}
        pruner = tp.pruner.MetaPruner(
            model, example, tp.importance.GroupMagnitudeImportance(p=2), global_pruning=False, pruning_ratio=0.5,
            ignored_layers=[model.lm_head], num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
            head_pruning_ratio=0.5, round_to=4, output_transform=lambda out: out.logits)
        conn.send(("stage", f"in pruner.step() (pruner built after {time.perf_counter() - start:.0f} s)"))
        pruner.step()
        layer = model.model.layers[0]
        detail = (f"hidden {model.lm_head.in_features}, q_proj out {layer.self_attn.q_proj.out_features}, "
                  f"ffn {layer.mlp.gate_proj.out_features}, {num_params(model):,} params")
        conn.send(("finished", time.perf_counter() - start, detail))
    except Exception as e:  # reported, not raised: the parent prints the outcome
        conn.send(("failed", time.perf_counter() - start, f"{type(e).__name__}: {e}"))


def bounded_full_recipe(overrides: list[str], example: torch.Tensor, bound_s: float) -> dict:
    """Run `full_recipe` in a spawned process, killed after `bound_s` seconds: {"status", "seconds", "line"}."""
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=full_recipe, args=(overrides, example, send))
    start = time.perf_counter()
    proc.start()
    send.close()  # the child holds the only write end: EOF once it exits
    stage, result = "loading the model", None
    while result is None and time.perf_counter() - start < bound_s:
        if receive.poll(1.0):
            try:
                msg = receive.recv()
            except EOFError:  # the child died without a result
                break
            stage, result = (msg[1], None) if msg[0] == "stage" else (stage, msg)
    seconds = time.perf_counter() - start
    if proc.is_alive():
        proc.kill()
    proc.join()
    if result is None and seconds >= bound_s:
        return {"status": "timeout", "seconds": seconds,
                "line": f"did not finish setting up within {bound_s:.0f} s (killed while {stage})"}
    if result is None:
        return {"status": "crashed", "seconds": seconds,
                "line": f"exited with code {proc.exitcode} after {seconds:.0f} s while {stage}"}
    status, seconds, detail = result
    verb = "finished in" if status == "finished" else "failed after"
    return {"status": status, "seconds": seconds, "line": f"{verb} {seconds:.1f} s: {detail}"}


def measured_rows(path: Path, ffn: int, teacher_config) -> list[dict]:
    """compactlm's two rows at `ffn` as prune_quality.py measured them (the same calibration rows and evaluator):
    run_all prunes each setting once."""
    results = json.loads(path.read_text())
    results = results.get("figures", results)  # a results file (common.write_result), or an older bare one
    shape = f"ffn {ffn}"
    picked = [("compactlm paper (activation, reconstruct=none)", "importance", "none"),
              ("compactlm defaults (activation, reconstruct=all)", "reconstruct", "all")]
    config = teacher_config.__class__(**teacher_config.to_dict() | {"intermediate_size": ffn})
    rows = []
    for name, table, sites in picked:
        found = [r for r in results.get(table, []) if r["shape"] == shape and r["method"] == "activation"
                 and r["reconstruct"] == sites and r["calib_sequences"] == 64
                 and (sites == "none" or (r["inputs"], r["ridge"]) == ("sequential", 1e-3))]
        if not found:
            sys.exit(f"bench_torch_pruning: {path} has no {table} row for {name} at {shape}")
        rows.append({"method": name, "ffn": ffn, "params": params_of_config(config),
                     "perplexity": found[0]["perplexity"], "tokens": None,
                     "seconds": found[0]["score_s"] + found[0]["reconstruct_s"]})
    return rows


# ---------------------------------------------------------------- main

def row(method: str, ffn: int, model, seconds: float, val: list) -> dict:
    result = perplexity(model, val)
    print(f"  {method}, ffn {ffn}: ppl {result['perplexity']:.2f} ({seconds:.1f} s)", flush=True)
    return {"method": method, "ffn": ffn, "params": num_params(model), "perplexity": result["perplexity"],
            "seconds": seconds, "tokens": result["tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-sequences", type=int, default=64)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--eval-sequences", type=int, default=64)
    parser.add_argument("--bound-s", type=float, default=600.0, help="time bound for TP's full-recipe set-up")
    parser.add_argument("--run-dir", default="runs/bench/torch_pruning")
    parser.add_argument("--methods", default="activation,taylor,magnitude",
                        help="Torch-Pruning importances to run (taylor: a backward pass per batch, the slowest)")
    parser.add_argument("--compactlm-from", type=Path,
                        help="take compactlm's rows from prune_quality.py's JSON (same calibration and evaluator) "
                             "instead of pruning again")
    parser.add_argument("--out", help="write the results here instead of benchmarks/results/torch_pruning.json")
    args = parser.parse_args()

    base = ["model=smollm2-135m", "data=python-docs", "eval.seq_len=256",
            f"calib.sequences={args.calib_sequences}", f"calib.seq_len={args.calib_seq_len}"]
    cfg = load_config(None, base)
    teacher, tokenizer = inputs.load(cfg)
    val = list(data.batches(inputs.load_splits(cfg, tokenizer, cfg.eval.seq_len).val[: args.eval_sequences],
                            cfg.eval.batch_size))
    calib = inputs.calibration_batches(cfg, tokenizer, teacher)
    defaults = f"compactlm defaults ({cfg.importance.method}, reconstruct={cfg.prune.reconstruct})"
    rows = [row("teacher (SmolLM2-135M)", teacher.config.intermediate_size, teacher, 0.0, val)]
    for ffn in FFNS:
        target = [f"target.intermediate_size={ffn}"]
        paper = ["importance.method=activation", "prune.reconstruct=none"]
        if args.compactlm_from:
            if args.calib_sequences != 64 or args.calib_seq_len != 256 or args.eval_sequences != 64:
                parser.error("--compactlm-from needs the calibration and evaluation sizes of prune_quality.py")
            rows += measured_rows(args.compactlm_from, ffn, teacher.config)
            print(f"  compactlm, ffn {ffn}: from {args.compactlm_from}", flush=True)
        for name, overrides, sub in () if args.compactlm_from else (
                ("compactlm paper (activation, reconstruct=none)", paper, "paper"), (defaults, [], "defaults")):
            model, seconds = compactlm_prune(base, target + overrides, Path(args.run_dir) / f"{sub}-{ffn}")
            rows.append(row(name, ffn, model, seconds, val))
        for method in args.methods.split(","):
            model, seconds = tp_prune(cfg, method, ffn, calib)
            rows.append(row(f"Torch-Pruning {method}", ffn, model, seconds, val))

    print(f"  Torch-Pruning full recipe: setting up (bound {args.bound_s:.0f} s) ...", flush=True)
    full = bounded_full_recipe(base, calib[0]["input_ids"][:1, :32], args.bound_s)

    table = Table(["method", "ffn", "params", "held-out perplexity", "seconds to prune"])
    for r in rows:
        table.add(r["method"], r["ffn"], r["params"], f"{r['perplexity']:,.2f}", f"{r['seconds']:.1f}")
    print(f"\nheld-out: {rows[0]['tokens']} tokens of python-docs; calibration: {args.calib_sequences} x "
          f"{args.calib_seq_len} tokens")
    print(f"Torch-Pruning full recipe (hidden+heads+MLP, ratio 0.5, head pruning): {full['line']}")
    write_result("torch_pruning", figures={"rows": rows, "full_recipe": full}, tables={"mlp": table},
                 values={"full_recipe": full["line"]}, inputs={"model": "smollm2-135m", "data": "python-docs"}, out=args.out)


if __name__ == "__main__":
    main()
