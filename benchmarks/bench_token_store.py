"""Data that does not fit in memory: a short distillation on a generated multi-GB .jsonl corpus.

Generates `--mb` MB of JSON lines (random documents of ~2 KB), two tiny random Llamas with SmolLM2's tokenizer
(vocabulary 49,152), then runs `compactlm distill` (`--tokens` tokens) in fresh processes, each under
/usr/bin/time: the first run builds the token store (only as far as the stage needs), the second reuses it.
With `--before-src DIR` (the `src` folder of an older checkout) the same command runs first with that code,
under an address-space cap of `--before-cap-gb` so that a version that reads everything fails fast instead of
swapping the machine. Prints, per run: wall seconds, seconds to the first training step, peak RSS.

    python benchmarks/bench_token_store.py --mb 2048 [--before-src /path/to/old/src] 
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, Table, write_result
WORDS = ("the of and to in is was for on that with as by at from his her which an are be this had not but it "
         "model data layer token train loss prune distil teacher student width depth head neuron channel").split()


def make_corpus(path: Path, mb: int, seed: int = 0) -> None:
    """`mb` MB of {"text": ...} lines, each a document of ~2 KB of random words."""
    rng = random.Random(seed)
    target, written, i = mb * 2**20, 0, 0
    with path.open("w") as f:
        while written < target:
            lines = []
            for _ in range(1000):
                text = f"document {i}. " + " ".join(rng.choices(WORDS, k=330))
                lines.append(json.dumps({"text": text}) + "\n")
                i += 1
            chunk = "".join(lines)
            f.write(chunk)
            written += len(chunk)


def make_models(root: Path) -> tuple[Path, Path]:
    """A tiny teacher (hidden 128, 4 layers) and student (hidden 64, 2 layers), random, SmolLM2's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from compactlm.models.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    out = []
    for name, hidden, layers in (("teacher", 128, 4), ("student", 64, 2)):
        config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=hidden // 4, num_hidden_layers=layers,
                             vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=True,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out.append(root / name)
    return out[0], out[1]


def run(label: str, src: Path, args: list[str], env: dict, cap_gb: float | None, work: Path) -> dict:
    """One `compactlm distill` in a fresh process: wall s, s to the first step, peak RSS GB, exit code."""
    timing, log = work / f"{label}.time", work / f"{label}.log"
    cmd = ["/usr/bin/time", "-f", "%M", "-o", str(timing), sys.executable, "-m", "compactlm", "distill", *args]
    if cap_gb:
        cmd = ["prlimit", f"--as={int(cap_gb * 2**30)}", *cmd]
    start = time.time()
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, env=env | {"PYTHONPATH": str(src)}, stdout=subprocess.DEVNULL, stderr=err)
        first_step = None
        while proc.poll() is None:
            if first_step is None and re.search(r"starting at step", log.read_text(errors="replace")):
                first_step = time.time() - start
            time.sleep(0.2)
    wall = time.time() - start
    rss = [line for line in timing.read_text().splitlines() if line.strip().isdigit()]
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    return {"run": label, "exit": proc.returncode, "wall_s": round(wall, 1),
            "first_step_s": None if first_step is None else round(first_step, 1),
            "peak_rss_gb": round(int(rss[-1]) / 2**20, 2) if rss else None, "last_line": tail[0][-160:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=2048, help="corpus size in MB")
    p.add_argument("--tokens", type=int, default=8192, help="distillation budget in tokens")
    p.add_argument("--before-src", type=Path, help="an older checkout's src folder, run first")
    p.add_argument("--before-cap-gb", type=float, default=8.0)
    p.add_argument("--work", type=Path, help="where the corpus, models and stores go (default: a temp dir)")
    p.add_argument("--out", type=Path, help="write the results here instead of benchmarks/results/token_store.json")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="compactlm-store-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    if not corpus.is_file() or corpus.stat().st_size < args.mb * 2**20:
        start = time.time()
        make_corpus(corpus, args.mb)
        print(f"generated {corpus.stat().st_size / 2**30:.2f} GB in {time.time() - start:.0f} s", flush=True)
    teacher, student = make_models(work)
    env = dict(os.environ) | {"COMPACTLM_TOKENS": str(work / "stores"), "TOKENIZERS_PARALLELISM": "true"}
    distill = [f"teacher={teacher}", f"student={student}", f"data={corpus}", f"distill.tokens={args.tokens}",
               "distill.batch_size=4", "distill.seq_len=256", "distill.eval_sequences=4", "distill.eval_every=0",
               "distill.save_every=0", "distill.lr=0.001", "distill.min_lr=0.0001", "distill.warmup_steps=1"]
    results = []
    runs = [("before", args.before_src, args.before_cap_gb)] if args.before_src else []
    runs += [("store: first run", ROOT / "src", None), ("store: second run", ROOT / "src", None)]
    for i, (label, src, cap) in enumerate(runs):
        results.append(run(label.split(":")[0] + str(i), src, distill + [f"out_dir={work / f'out{i}'}"], env, cap, work))
        results[-1]["run"] = label
        r = results[-1]
        print(f"{label:<18} exit {r['exit']:>3}  wall {r['wall_s']:7.1f} s  first step "
              f"{r['first_step_s'] if r['first_step_s'] is not None else '-':>6} s  peak RSS {r['peak_rss_gb']} GB"
              + (f"  ({r['last_line']})" if r["exit"] else ""), flush=True)
    table = Table(["run", "time to the first training step", "whole run", "peak RSS"])
    for r in results:
        failed = f"failed after {r['wall_s']:.0f} s" if r["exit"] else ""
        table.add(r["run"], failed or (f"{r['first_step_s']} s" if r["first_step_s"] is not None else ""),
                  "" if failed else f"{r['wall_s']} s", f"{r['peak_rss_gb']} GB")
    write_result("token_store", figures={"corpus_gb": corpus.stat().st_size / 2**30, "runs": results},
                 tables={"runs": table}, out=args.out)


if __name__ == "__main__":
    main()
