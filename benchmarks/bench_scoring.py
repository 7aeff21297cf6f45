"""Cost of activation scoring against a plain no-grad forward over the same calibration batches.

Times, interleaved and repeated: (a) the full causal LM forward (what a user would run), (b) the decoder
alone (no LM head), (c) `activation_scores`. Goal: (c) / (a) <= 1.15. Prints a table and writes benchmarks/results/scoring.json.

    python benchmarks/bench_scoring.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import Table, write_result

import torch

from compactlm.data import load_texts
from compactlm.importance import activation_scores
from compactlm.models.family import family_of, get_module
from compactlm.models.loading import load_model, load_tokenizer


def calibration_batches(tokenizer, source: str, sequences: int, seq_len: int, batch_size: int) -> list[dict]:
    """Pack the data source's tokens into (sequences, seq_len) rows and split them into batches without padding."""
    text = "\n\n".join(load_texts(source, max_chars=sequences * seq_len * 8))  # ~4 chars a token: plenty
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < sequences * seq_len:
        raise SystemExit(f"{source} has {len(ids)} tokens, fewer than {sequences} x {seq_len}")
    rows = torch.tensor(ids[: sequences * seq_len], dtype=torch.long).view(sequences, seq_len)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in rows.split(batch_size)]


def timed(fn, device: torch.device) -> float:
    """Wall seconds of fn(), synchronising an accelerator before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="python-docs", help="any compactlm data source")
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--aggregation", default="l2_mean")
    p.add_argument("--head-score", default="paper", choices=("paper", "channel"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="write the results here instead of benchmarks/results/scoring.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    model = load_model(args.model, dtype=args.dtype, device=device)
    tokenizer = load_tokenizer(args.model)
    batches = calibration_batches(tokenizer, args.data, args.sequences, args.seq_len, args.batch_size)
    base = get_module(model, family_of(model).base_path)

    def forward(module) -> None:
        with torch.no_grad():
            for b in batches:
                module(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                       use_cache=False)

    runs = {
        "forward (full LM)": lambda: forward(model),
        "forward (decoder, no LM head)": lambda: forward(base),
        "activation_scores": lambda: activation_scores(model, batches, aggregation=args.aggregation,
                                                       head_score=args.head_score),
    }
    names = list(runs)
    for name in names:  # warm-up: allocator, kernels, first-call overheads
        timed(runs[name], device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.repeats):  # interleaved; the order rotates so that no run always goes first
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(timed(runs[name], device))

    tokens = args.sequences * args.seq_len
    median = {name: statistics.median(t) for name, t in times.items()}
    ref, dec = median["forward (full LM)"], median["forward (decoder, no LM head)"]
    print(f"model {args.model} ({args.dtype}, {device}, {torch.get_num_threads()} threads), "
          f"{args.sequences} x {args.seq_len} tokens in batches of {args.batch_size}, "
          f"{args.repeats} repeats, aggregation {args.aggregation}, head_score {args.head_score}")
    print(f"{'run':32} {'median s':>9} {'min s':>8} {'max s':>8} {'tok/s':>9} {'x full':>7} {'x decoder':>9}")
    for name in names:
        t = times[name]
        print(f"{name:32} {median[name]:9.3f} {min(t):8.3f} {max(t):8.3f} {tokens / median[name]:9.0f} "
              f"{median[name] / ref:7.3f} {median[name] / dec:9.3f}")
    ratio = median["activation_scores"] / ref
    print(f"scoring / plain forward = {ratio:.3f}x (goal <= 1.15x): {'PASS' if ratio <= 1.15 else 'FAIL'}; "
          f"hook overhead over the decoder alone = {median['activation_scores'] / dec:.3f}x")
    table = Table(["benchmark", "compactlm", "plain reference", "ratio"])
    table.add(f"scoring against a plain no-grad forward ({args.data}, {args.sequences} x {args.seq_len} tokens)",
              f"`activation_scores`: {median['activation_scores']:.1f} s", f"full no-grad forward: {ref:.1f} s",
              f"**{ratio:.2f}x** (goal <= 1.15x); {median['activation_scores'] / dec:.2f}x a decoder-only forward")
    write_result("scoring", figures={"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                      "times_s": times, "median_s": median, "ratio_vs_forward": ratio,
                                      "ratio_vs_decoder": median["activation_scores"] / dec, "tokens": tokens},
                 tables={"ratios": table}, inputs={"model": args.model, "data": args.data}, out=args.out)


if __name__ == "__main__":
    main()
