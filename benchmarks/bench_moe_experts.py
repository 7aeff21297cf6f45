"""Expert pruning of a mixture of experts: REAP against routing frequency against random experts.

    python benchmarks/bench_moe_experts.py          # about 30 minutes alone on 2 CPU cores; rerun resumes

Random experts have nothing to find, so the teacher is a tiny Qwen3-MoE (hidden 128, 4 layers, 16 experts of
width 128, 2 per token, the load-balancing loss on) trained from random weights on python-docs with
`compactlm train` until its experts specialise, with an offline byte-level BPE tokenizer trained on the same
corpus. The teacher is the training's best held-out checkpoint (it overfits the 1.5 MB corpus afterwards).
Then, through the pipeline's stages on the same calibration text and the same held-out rows:

1. `score`: activation importance, with the expert metrics "reap_sum", "reap" and "frequency";
2. `prune` to each --keep experts per layer (8 and 4 of 16; nothing else cut, no refit) by each expert metric,
   and by random expert choices (3 seeds);
3. held-out perplexity right after the cut, then after --kd-steps of `distill` from the unpruned teacher.

Writes benchmarks/results/moe_experts.json and prints one row per expert count and metric.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import torch
from common import Table, write_result

from compactlm import data, inputs, stages
from compactlm.config import load_config
from compactlm.importance.scores import Scores
from compactlm.metrics import perplexity
from compactlm.models.loading import load_model

SEEDS = (0, 1, 2)
TEACHER = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
               num_experts=16, num_experts_per_tok=2, moe_intermediate_size=128, intermediate_size=512,
               output_router_logits=True, router_aux_loss_coef=0.01, tie_word_embeddings=True,
               max_position_embeddings=512)


def tokenizer(vocab: int = 4096):
    """Byte-level BPE trained on the start of python-docs (offline: nothing to download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = data.load_texts("python-docs", max_chars=2_000_000)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def initial_model(path: Path) -> None:
    """The untrained teacher: random weights and the tokenizer, as a checkpoint folder."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    if (path / "config.json").is_file():
        return
    tok = tokenizer()
    config = Qwen3MoeConfig(vocab_size=len(tok), bos_token_id=0, eos_token_id=0, pad_token_id=0, **TEACHER)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/bench/moe")
    parser.add_argument("--train-steps", type=int, default=2000, help="teacher training steps of 16 x 256 tokens")
    parser.add_argument("--keep", type=int, nargs="+", default=[8, 4], help="experts kept per layer (of 16)")
    parser.add_argument("--kd-steps", type=int, default=100, help="distillation steps of 8 x 256 tokens")
    parser.add_argument("--val-rows", type=int, default=48)
    parser.add_argument("--out", help="write the results here instead of benchmarks/results/moe_experts.json")
    args = parser.parse_args()

    run = Path(args.run_dir)
    base = ["data=python-docs", "seed=0", "calib.sequences=64", "calib.seq_len=256"]
    initial_model(run / "init")
    train = [f"train.{k}={v}" for k, v in (("steps", args.train_steps), ("lr", 2e-3), ("min_lr", 2e-4),
                                            ("batch_size", 16), ("seq_len", 256), ("warmup_steps", 50),
                                            ("eval_every", 250), ("save_every", 250), ("eval_sequences", 16))]
    teacher = run / "teacher" / "best"  # the lowest held-out loss: the 1.5 MB corpus is overfitted later
    if not (teacher / "config.json").is_file():
        stages.train(load_config(None, base + train + [f"model={run / 'init'}", f"out_dir={run / 'teacher'}",
                                                      "resume=true"]))
    scores_file = run / "score" / stages.SCORES_FILE
    if not scores_file.is_file():
        stages.score(load_config(None, base + [f"model={teacher}", f"out_dir={run / 'score'}",
                                               "importance.layer_metrics=[]"]))
    scores = Scores.load(scores_file)
    # each way's ranking, saved in a copy of the scores under the expert metric the prune stage is told to use
    ways = {name: (name, scores.experts[name]) for name in ("reap_sum", "reap", "frequency")}
    for seed in SEEDS:
        shape = scores.experts["reap"].shape
        ways[f"random-{seed}"] = ("random", torch.rand(shape, generator=torch.Generator().manual_seed(seed)))

    cfg = load_config(None, base + [f"model={teacher}", "distill.seq_len=256"])
    model, tok = inputs.load(cfg)
    val = inputs.load_splits(cfg, tok, 256, calib=False, val_rows=args.val_rows).val[: args.val_rows]
    batches = list(data.batches(val, 8))
    teacher_ppl = perplexity(model, batches)["perplexity"]
    result = {"teacher": TEACHER, "train_steps": args.train_steps,
              "kd_steps": args.kd_steps, "val_rows": len(val), "teacher_perplexity": teacher_ppl,
              "frequency": scores.experts["frequency"].tolist(), "keep": {}}
    for keep in args.keep:
        rows = {}
        for name, (metric, ranking) in ways.items():
            folder, distilled = run / f"prune-{keep}-{name}", run / f"distill-{keep}-{name}"
            if not (folder / "config.json").is_file():
                variant_file = run / f"scores-{keep}-{name}.safetensors"
                dataclasses.replace(scores, experts={metric: ranking}).save(variant_file)
                stages.prune(load_config(None, base + [
                    f"model={teacher}", f"out_dir={folder}", f"importance.scores={variant_file}",
                    f"target.num_experts={keep}", f"target.expert_metric={metric}", "prune.reconstruct=none"]))
            if not (distilled / "final" / "config.json").is_file():
                stages.distill(load_config(None, base + [
                    f"teacher={teacher}", f"student={folder}", f"out_dir={distilled}", "resume=true",
                    f"distill.steps={args.kd_steps}", "distill.lr=1e-3", "distill.min_lr=1e-4",
                    "distill.batch_size=8", "distill.seq_len=256", "distill.warmup_steps=5",
                    "distill.eval_every=1000", "distill.save_every=20"]))
            rows[name] = {"pruned": perplexity(load_model(str(folder)), batches)["perplexity"],
                          "distilled": perplexity(load_model(str(distilled / "final")), batches)["perplexity"]}
            print(f"{keep} experts, {name}: pruned {rows[name]['pruned']:.2f}, distilled {rows[name]['distilled']:.2f}",
                  flush=True)
        random_rows = [rows.pop(f"random-{s}") for s in SEEDS]
        rows["random (mean of 3)"] = {k: statistics.mean(r[k] for r in random_rows) for k in ("pruned", "distilled")}
        result["keep"][keep] = {"rows": rows, "random_seeds": random_rows, "kept_experts_shared": {
            f"{a} & {b}": shared(scores, a, b, keep)
            for a, b in (("reap_sum", "reap"), ("reap_sum", "frequency"), ("reap", "frequency"))}}
    write_result("moe_experts", figures=result, tables={"experts": experts_table(result)}, out=args.out,
                 inputs={"data": "python-docs"})
    frequency = scores.experts["frequency"]  # (layers, experts) shares of the routed slots
    print(f"\nrouting: the busiest expert of a layer takes {frequency.max(-1).values.min():.1%}-"
          f"{frequency.max(-1).values.max():.1%} of its slots; experts under 0.5% per layer: "
          f"{(frequency < 0.005).sum(-1).tolist()}")
    print(f"teacher {teacher_ppl:.2f}; {len(val)} held-out rows; held-out perplexity after the cut and after "
          f"{args.kd_steps} KD steps")
    print(f"{'experts kept':>12} {'expert metric':>20} {'pruned':>10} {'after KD':>10}")
    for keep, block in result["keep"].items():
        for name, row in block["rows"].items():
            print(f"{keep:>12} {name:>20} {row['pruned']:>10.2f} {row['distilled']:>10.2f}")
        print(f"{'':>12} kept experts shared: " + ", ".join(f"{k} {v:.0%}" for k, v in block["kept_experts_shared"].items()))


def experts_table(result: dict) -> Table:
    """Held-out perplexity after the cut and after distillation, per experts kept and expert metric."""
    table = Table(["experts kept", "expert metric", "after the cut", f"after {result['kd_steps']} KD steps"])
    for keep, block in result["keep"].items():
        for name, row in block["rows"].items():
            label = {"reap_sum": "reap_sum (default)", "random (mean of 3)": "random (mean of 3 seeds)"}.get(name, name)
            table.add(f"{keep} of 16", label, f"{row['pruned']:.2f}", f"{row['distilled']:.2f}")
    return table


def shared(scores: Scores, a: str, b: str, keep: int) -> float:
    """The share of the experts kept by metric `a` that metric `b` keeps too, over all layers."""
    kept = lambda metric: scores.experts[metric].topk(keep, dim=-1).indices  # noqa: E731  (layers, keep)
    return float(torch.stack([torch.isin(x, y) for x, y in zip(kept(a), kept(b))]).float().mean())


if __name__ == "__main__":
    main()
