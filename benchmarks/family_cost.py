"""The family's cost against training from scratch (P1's headline, in miniature).

    python benchmarks/family_cost.py [--teacher-steps 384] [--kd-steps 48] [--max-factor 16]

1. A byte-level BPE tokenizer of 2,048 tokens, trained on the python-docs corpus (all its documents, as
   tokenizer=char does; the held-out rows' text is in its merges, not in any model's training).
2. The teacher, trained from scratch by `compactlm train`: a Llama of hidden 256, 6 layers, 4 heads of 64
   (no grouping), MLP 1024, tied embeddings (6.8M parameters), for T = --teacher-steps steps of 16 x 256
   tokens, AdamW, LR 1e-3 cosine to 1e-4.
3. Two sizes derived by `compactlm run` as a cascade (teacher -> 1/2 -> 1/4 of the parameters): hidden 192,
   3 heads, MLP 640 (3.5M), then hidden 128, 2 heads, MLP 448 (1.7M); each scored, pruned (with the refit) and
   distilled from the teacher for N = --kd-steps steps of the same batches and schedule (plain forward KL).
4. Each derived shape trained from scratch (init=random, the teacher's recipe) for N, 2N, 4N, ... tokens, each
   a run of its own with its own cosine schedule, until its held-out loss is at most the derived model's, or
   --max-factor x N is spent.

Held-out loss: mean next-token cross-entropy (nats) on the same 64 validation rows of 256 tokens for every
model. Compute: 6 x parameters x tokens for each token trained, plus 2 x the teacher's parameters for each token
it reads in distillation and the forward passes of scoring and the refit. Resumes: every finished run is kept in
--run-dir and its result in a JSON beside it. Writes benchmarks/results/family_cost.json and .png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS, Table, write_result

from compactlm import data, inputs, pipeline, stages
from compactlm.config import load_config

BPE_VOCAB = 2048
BATCH, SEQ = 16, 256  # every training: 16 rows of 256 tokens a step
TEACHER = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "num_hidden_layers": 6,
           "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 64, "intermediate_size": 1024,
           "hidden_act": "silu", "max_position_embeddings": SEQ, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
           "vocab_size": BPE_VOCAB}
SIZES = {"1/2": {"hidden_size": 192, "num_attention_heads": 3, "num_key_value_heads": 3, "intermediate_size": 640},
         "1/4": {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 448}}
RECIPE = {"batch_size": BATCH, "seq_len": SEQ, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 20, "eval_every": 0,
          "save_every": 50, "eval_sequences": 16}
VAL_ROWS = 64
CALIB = 64  # calibration rows of SEQ tokens, read by scoring and by the refit (forward passes of the source)


def common_keys(tokenizer: Path) -> list[str]:
    return ["data=python-docs", f"tokenizer={tokenizer}", "seed=0", "dtype=float32"]


def build_tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer of BPE_VOCAB tokens over python-docs, saved as a Hugging Face fast tokenizer."""
    if (folder / "tokenizer.json").is_file():
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(data.load_texts("python-docs"), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return folder


def architecture(folder: Path, config: dict) -> Path:
    """A model folder holding only config.json: what `compactlm train init=random` builds fresh weights from."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return folder


def train(name: str, arch: Path, steps: int, tokenizer: Path, run_dir: Path) -> Path:
    """`compactlm train` from scratch for `steps` steps into run_dir/name; its final model."""
    out = run_dir / name
    if not (out / "final" / "config.json").is_file():
        stages.train(load_config(None, [f"model={arch}", "init=random", f"out_dir={out}", "resume=true",
                                        f"train.steps={steps}", *common_keys(tokenizer),
                                        *(f"train.{k}={v}" for k, v in RECIPE.items())]))
    return out / "final"


def splits(tokenizer: Path):
    """The data layer's train and validation rows of SEQ tokens under the benchmark's tokenizer."""
    from compactlm.models.loading import load_tokenizer

    return inputs.load_splits(load_config(None, common_keys(tokenizer)), load_tokenizer(str(tokenizer)), SEQ,
                              calib=False, val_rows=VAL_ROWS)


def measure(model_dir: Path, batches: list) -> dict:
    """Parameters and mean next-token CE (nats) on the held-out `batches` of the model in `model_dir`."""
    from compactlm.metrics import perplexity
    from compactlm.models.loading import load_model
    from compactlm.models.params import num_params

    model = load_model(str(model_dir))
    return {"params": num_params(model), "loss": perplexity(model, batches)["loss"]}


def recorded(path: Path, compute) -> dict:
    """The JSON at `path`, or `compute()` (a training and its measurement) written there first: the benchmark
    resumes run by run."""
    if path.is_file():
        result = json.loads(path.read_text())
        result.pop("wall_s", None)  # the first runs timed only the measurement: not a figure
        return result
    result = compute()
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-steps", type=int, default=384, help="the teacher's training steps (T)")
    parser.add_argument("--kd-steps", type=int, default=48, help="distillation steps per derived size (N)")
    parser.add_argument("--max-factor", type=int, default=16, help="from scratch up to this many times N")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench/family_cost"))
    parser.add_argument("--out", default=str(RESULTS / "family_cost.json"))  # its plot: the same name, .png
    args = parser.parse_args()
    run_dir = args.run_dir / f"T{args.teacher_steps}-N{args.kd_steps}"
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(args.run_dir / "tokenizer")
    data_rows = splits(tokenizer)
    batches = list(data.batches(data_rows.val[:VAL_ROWS], 16))
    step_tokens = BATCH * SEQ

    teacher_dir = run_dir / "teacher" / "final"
    teacher = recorded(run_dir / "teacher.json", lambda: {"tokens": args.teacher_steps * step_tokens, **measure(
        train("teacher", architecture(run_dir / "arch" / "teacher", TEACHER), args.teacher_steps, tokenizer, run_dir),
        batches)})
    print(f"teacher {teacher['params'] / 1e6:.2f}M, {teacher['tokens']:,} tokens: held-out loss {teacher['loss']:.4f}")

    derived_dir = run_dir / "derived"
    keys = [f"target.{k}=[{','.join(str(SIZES[s][k]) for s in SIZES)}]" for k in SIZES["1/2"]]
    if not (derived_dir / "report" / pipeline.DONE).is_file():
        pipeline.run(load_config(None, [f"model={teacher_dir}", f"out_dir={derived_dir}", *keys, *common_keys(tokenizer),
                                        f"calib.sequences={CALIB}", f"calib.seq_len={SEQ}", "eval.speed=false",
                                        f"eval.sequences={VAL_ROWS}", f"eval.seq_len={SEQ}",
                                        f"distill.steps={args.kd_steps}",
                                        *(f"distill.{k}={v}" for k, v in RECIPE.items())]))
    rows = []
    for i, size in enumerate(SIZES, start=1):
        distilled = derived_dir / f"size-{i}" / "distill" / "final"
        derived = recorded(run_dir / f"derived-{i}.json", lambda d=distilled: {
            "tokens": args.kd_steps * step_tokens, **measure(d, batches)})
        arch = architecture(run_dir / "arch" / f"size-{i}",
                            json.loads((distilled / "config.json").read_text()) | {"torch_dtype": "float32"})
        scratch, factor = [], 1
        while factor <= args.max_factor:
            name, steps = f"scratch-{i}-x{factor}", factor * args.kd_steps
            result = recorded(run_dir / f"{name}.json", lambda: {"factor": factor, "tokens": steps * step_tokens,
                                                                 **measure(train(name, arch, steps, tokenizer, run_dir), batches)})
            scratch.append(result)
            print(f"size {size}: from scratch x{factor} ({result['tokens']:,} tokens) loss {result['loss']:.4f} "
                  f"against derived {derived['loss']:.4f}", flush=True)
            if result["loss"] <= derived["loss"]:
                break
            factor *= 2
        rows.append({"size": size, "derived": derived, "scratch": scratch})
    report(args, teacher, rows, train_tokens=len(data_rows.train) * SEQ)


def family_compute(teacher: dict, rows: list[dict]) -> dict:
    """FLOPs of the family both ways, the teacher's training in both (6 x params a trained token, 2 x params a
    forward token). Derived: each size's distillation (its own training and the teacher's forward passes) and
    the source's forward passes over the calibration rows, twice (scoring, refit). From scratch: each size's
    matching run (the last one tried, a lower bound when none matched)."""
    base = 6 * teacher["params"] * teacher["tokens"]
    calib = CALIB * SEQ
    derived = base
    sources = [teacher["params"]] + [r["derived"]["params"] for r in rows[:-1]]
    for r, source in zip(rows, sources):
        n, p = r["derived"]["tokens"], r["derived"]["params"]
        derived += 6 * p * n + 2 * teacher["params"] * n + 2 * 2 * source * calib
    scratch = base + sum(6 * r["derived"]["params"] * r["scratch"][-1]["tokens"] for r in rows)
    return {"teacher": base, "derived": derived, "scratch": scratch, "ratio": scratch / derived}


def report(args, teacher: dict, rows: list[dict], train_tokens: int) -> None:
    """family_cost.json (train_tokens: the training split's tokens, how often each run repeats it) and its plot."""
    table = Table(["model", "parameters", "training tokens", "held-out loss", "from scratch to match",
                   "tokens against derived"])
    table.add("teacher (from scratch)", f"{teacher['params'] / 1e6:.2f}M", f"{teacher['tokens']:,}",
              f"{teacher['loss']:.3f}", "", "")
    ratios = {}
    for r in rows:
        d, last = r["derived"], r["scratch"][-1]
        matched = last["loss"] <= d["loss"]
        ratios[r["size"]] = last["factor"] if matched else None
        table.add(f"{r['size']} derived (prune + KD)", f"{d['params'] / 1e6:.2f}M", f"{d['tokens']:,}",
                  f"{d['loss']:.3f}", "", "")
        for s in r["scratch"]:
            table.add(f"{r['size']} from scratch", f"{d['params'] / 1e6:.2f}M", f"{s['tokens']:,}", f"{s['loss']:.3f}",
                      "matched" if s["loss"] <= d["loss"] else "not yet",
                      f"{s['factor']}x" if s["loss"] <= d["loss"] else "")
        if not matched:
            table.rows[-1][-1] = f"> {last['factor']}x (budget spent)"
    compute = family_compute(teacher, rows)
    longest = max(s["tokens"] for r in rows for s in r["scratch"])
    values = {"family_compute_ratio": f"{compute['ratio']:.2f}x", "train_tokens": f"{train_tokens:,}",
              "teacher_epochs": f"{teacher['tokens'] / train_tokens:.1f}", "longest_epochs": f"{longest / train_tokens:.1f}"}
    for r in rows:
        key = r["size"].replace("/", "_")
        ratio = ratios[r["size"]]
        values[f"tokens_to_match_{key}"] = f"{ratio}x" if ratio else f"> {r['scratch'][-1]['factor']}x"
    print(f"family compute from scratch / derived: {compute['ratio']:.2f}x (a lower bound when a size never matched)")
    out = write_result("family_cost", figures={"teacher": teacher, "sizes": rows, "compute_flops": compute,
                                               "teacher_steps": args.teacher_steps, "kd_steps": args.kd_steps,
                                               "tokens_per_step": BATCH * SEQ, "max_factor": args.max_factor,
                                               "train_tokens": train_tokens},
                       tables={"main": table}, values=values, inputs={"data": "python-docs"}, out=args.out)
    plot(teacher, rows, out.with_suffix(".png"))


def plot(teacher: dict, rows: list[dict], path: Path) -> None:
    """Held-out loss against training tokens: each size from scratch (a line over budgets), derived (a star at
    its distillation tokens), the teacher (a square)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([teacher["tokens"]], [teacher["loss"]], "ks", label=f"teacher {teacher['params'] / 1e6:.1f}M")
    for r, color in zip(rows, ("tab:blue", "tab:orange")):
        p = r["derived"]["params"] / 1e6
        ax.plot([s["tokens"] for s in r["scratch"]], [s["loss"] for s in r["scratch"]], "o-", color=color,
                label=f"{r['size']} ({p:.1f}M) from scratch")
        ax.plot([r["derived"]["tokens"]], [r["derived"]["loss"]], "*", color=color, markersize=14,
                label=f"{r['size']} derived (prune + KD)")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens (derived: distillation tokens only)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("python-docs, byte-level BPE 2,048")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
